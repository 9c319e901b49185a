"""launch/evaluate.py on a checkpoint and on its merged export: same completions, same loss."""

from __future__ import annotations

import json

import pytest

from dude_dist.tracking import read_scalars
from tests.helpers import launcher_cmd, run, train

pytestmark = pytest.mark.slow


def test_checkpoint_and_merged_export_evaluate_alike(tmp_path):
    out = tmp_path / "run"
    sets = ["train.max_steps=4", "train.save_every=0", "eval.limit=4", "eval.max_new_tokens=12",
            "eval.tasks=[gsm8k, boolq]"]
    train(out, *sets)
    base = ["launch/evaluate.py", "--config", "configs/tiny_cpu.yaml", "--set", f"output_dir={out}"]
    for item in sets:
        base += ["--set", item]
    run(launcher_cmd(1, "python") + base + ["--checkpoint", "auto", "--out", str(tmp_path / "ckpt.json")])
    exported = tmp_path / "exported"
    run(launcher_cmd(1, "python") + ["launch/export.py", "--config", "configs/tiny_cpu.yaml", "--set",
                                     f"output_dir={out}", "--out", str(exported)])
    run(launcher_cmd(1, "python") + base + ["--merged", str(exported), "--out", str(tmp_path / "merged.json")])
    # The merged model loaded partitioned over 2 ranks (ZeRO-3, every parameter partitioned), its
    # prompts shared out over the ranks: the same completions, in the same order.
    run(launcher_cmd(2, "torchrun") + base + ["--merged", str(exported), "--out", str(tmp_path / "zero3.json"),
                                              "--set", "deepspeed.stage3_param_persistence_threshold=0"])
    a = json.loads((tmp_path / "ckpt.json").read_text())
    b = json.loads((tmp_path / "merged.json").read_text())
    c = json.loads((tmp_path / "zero3.json").read_text())
    assert set(a["tasks"]) == {"gsm8k", "boolq"}
    for task in a["tasks"]:
        ra, rb, rc = a["tasks"][task], b["tasks"][task], c["tasks"][task]
        assert ra["n"] == rc["n"] == 4 and 0.0 <= ra["accuracy"] <= 1.0
        assert [r["completion"] for r in ra["records"]] == [r["completion"] for r in rb["records"]]
        assert [r["completion"] for r in rc["records"]] == [r["completion"] for r in rb["records"]]
    assert a["loss"]["loss"] == pytest.approx(b["loss"]["loss"], rel=1e-5)
    assert c["loss"]["loss"] == pytest.approx(b["loss"]["loss"], rel=1e-5)
    scalars = read_scalars(out / "tensorboard")
    assert "eval/gsm8k_accuracy" in scalars and "eval/boolq_accuracy" in scalars
    # eval.mode loglik: 5 items a task (3 on one rank, 2 on the other; the ranks run the same
    # number of forwards under ZeRO-3), the same scores as one process
    loglik = ["--set", "eval.mode=loglik", "--set", "eval.tasks=[boolq, ARC-Easy, winogrande]", "--set",
              "eval.limit=5", "--set", "eval.batch_size=2"]
    run(launcher_cmd(1, "python") + base + loglik + ["--merged", str(exported), "--out", str(tmp_path / "ll1.json")])
    run(launcher_cmd(2, "torchrun") + base + loglik + ["--merged", str(exported), "--out", str(tmp_path / "ll2.json"),
                                                       "--set", "deepspeed.stage3_param_persistence_threshold=0"])
    one, two = (json.loads((tmp_path / f"ll{n}.json").read_text())["tasks"] for n in (1, 2))
    assert set(one) == {"boolq", "ARC-Easy", "winogrande"}
    for task in one:
        assert one[task]["n"] == two[task]["n"] == 5
        for r1, r2 in zip(one[task]["records"], two[task]["records"]):
            assert r1["choices"] == r2["choices"] and r1["predicted"] == r2["predicted"]
            assert r1["logprobs"] == pytest.approx(r2["logprobs"], abs=1e-4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run(launcher_cmd(1, "python") + ["launch/evaluate.py", "--config", "configs/tiny_cpu.yaml", "--set",
                                            f"output_dir={tmp_path / 'nothing'}"], check=False)
    assert proc.returncode != 0
    assert "no complete checkpoint" in proc.stderr
