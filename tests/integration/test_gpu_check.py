"""benchmarks/gpu_check.py in dry mode (CPU, gloo, tiny shapes): every stage runs, passes, and
reports plausible figures, so the script a GPU machine runs keeps working between GPU runs.

    OMP_NUM_THREADS=1 python -m pytest tests/integration/test_gpu_check.py -q   # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.helpers import PY, ROOT, proc_env

pytestmark = pytest.mark.slow

STAGES = ["setup", "numerics", "zero3_resume", "bf16_sync", "layer_bench", "train_bench", "packing_bench"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory, stories_path, data_dir):
    out, work = tmp_path_factory.mktemp("gpu_check_out"), tmp_path_factory.mktemp("gpu_check_work")
    before = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()}
    proc = subprocess.run([PY, "benchmarks/gpu_check.py", "--dry", "--work", str(work)], cwd=ROOT,
                          env=proc_env(OUT=str(out)), capture_output=True, text=True, timeout=900)
    after = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()}
    report = json.loads((out / "gpu_check.json").read_text())
    return {"proc": proc, "out": out, "report": report, "stages": report["stages"], "new_results": after - before}


def test_every_stage_passes_and_says_so(dry):
    proc, report = dry["proc"], dry["report"]
    detail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, detail
    assert report["mode"] == "dry" and report["passed"] is True
    assert list(dry["stages"]) == STAGES
    for name, stage in dry["stages"].items():
        assert stage["status"] == "pass", (name, stage["checks"], stage["error"])
        assert stage["checks"] and all(c["ok"] for c in stage["checks"]), name
        assert 0 < stage["seconds"] <= stage["limit_s"], (name, stage["seconds"])
        assert f"[gpu_check] {name}: PASS" in proc.stdout
    assert f"[gpu_check] PASS: {len(STAGES)}/{len(STAGES)} stages passed" in proc.stdout
    versions = dry["stages"]["setup"]["figures"]["versions"]
    assert all(versions[name] for name in ("torch", "deepspeed", "datasets", "transformers", "peft")), versions


def test_numerics_ran_the_dude_tests(dry):
    figures = dry["stages"]["numerics"]["figures"]
    assert figures["device"] == "cpu" and figures["files"] == ["tests/unit/test_dude.py", "tests/unit/test_bf16.py",
                                                                "tests/unit/test_loss.py"]
    assert figures["passed"] >= 15 and figures["failed_tests"] == []


def test_zero3_run_resumes_to_the_same_losses(dry):
    f = dry["stages"]["zero3_resume"]["figures"]
    assert f["backend"] == "gloo" and f["persistence_threshold"] == 0
    assert len(f["losses"]) == f["steps"] == 4
    assert all(3 < loss < 12 for loss in f["losses"]), f["losses"]
    assert f["resumed_start_step"] == 2 and sorted(f["resumed_losses"]) == ["3", "4"]
    assert f["max_abs_loss_diff"] <= 1e-6
    assert f["svd_count"] == 10 and f["resumed_svd_count"] == 0  # stories260K: 5 layers x (q, v)
    assert f["eval_loss_end"] < f["eval_loss_start"]
    assert f["median_step_s"] > 0 and f["peak_memory_bytes"] > 0


def test_bf16_run_of_the_qwen_shaped_model(dry):
    f = dry["stages"]["bf16_sync"]["figures"]
    assert f["model"]["heads"] == 14 and f["model"]["kv_heads"] == 2
    assert len(f["losses"]) == 3 and all(math.isfinite(x) for x in f["losses"])
    assert abs(f["losses"][0] - math.log(f["model"]["vocab"])) < 1.0  # random weights: near-uniform logits
    assert f["dude_layers"] == 2 * f["model"]["layers"] and f["trainable_params"] > 0
    assert f["tokens_per_s_after_step_1"] > 0
    assert f["syncs"]["enabled"] is False  # the sync count needs CUDA
    assert "host-sync count needs CUDA" in " ".join(dry["stages"]["bf16_sync"]["notes"])


def test_layer_benchmark_measured_every_implementation(dry):
    rows = dry["stages"]["layer_bench"]["figures"]["rows"]
    assert {r["impl"] for r in rows} == {"lora", "peft_lora", "peft_dora", "dude_exact", "dude_detach",
                                         "dude_exact_eager", "dude_detach_eager", "dude_recompute"}
    by = {r["impl"]: r for r in rows}
    assert all(r["median_ms"] > 0 for r in rows)
    assert by["lora"]["x_lora"] == 1
    x_mib = 64 * 4096 * 2 / 2**20  # every implementation saves x: 64 tokens x 4096, bf16
    assert all(r["saved_mib"] >= x_mib for r in rows), [(r["impl"], r["saved_mib"]) for r in rows]
    # PEFT's DoRA builds the [out, in] weight every step; at 64 tokens that outweighs the matmuls.
    assert by["peft_dora"]["median_ms"] > by["lora"]["median_ms"]


def test_train_benchmark_compared_three_systems_on_the_same_tokens(dry):
    figures = dry["stages"]["train_bench"]["figures"]
    rows = figures["rows"]
    assert {r["system"] for r in rows} == {"dude_dist", "peft_dora_pissa", "peft_lora"}
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss_last"]) for r in rows)
    first = [r["loss_first"] for r in rows]
    assert max(first) - min(first) < 0.01 * max(first), first  # the same model at step 0
    assert figures["stories260K: dude_dist / peft_lora tokens/s"] > 0


def test_packing_benchmark_compared_padded_and_packed_rows(dry):
    figures = dry["stages"]["packing_bench"]["figures"]
    by = {r["mode"]: r for r in figures["rows"]}
    assert set(by) == {"padded", "packed"}
    assert figures["attn_implementation"] == "sdpa"  # auto without CUDA
    assert 0.9 < figures["fill_ratio"] <= 1.0
    # whole samples filling rows of 1024: a packed step carries several times a padded step's tokens
    assert by["packed"]["real_tokens_per_step"] > 2 * by["padded"]["real_tokens_per_step"]
    assert all(r["real_tokens_per_s"] > 0 and math.isfinite(r["loss_last"]) for r in by.values())
    assert figures["stories260K: packed / padded real tokens/s"] == pytest.approx(
        by["packed"]["real_tokens_per_s"] / by["padded"]["real_tokens_per_s"])


def test_report_files_and_nothing_written_into_the_tree(dry):
    out = dry["out"]
    names = {p.name for p in out.iterdir()}
    assert names == {"gpu_check.json", "gpu_check.md", "gpu_check.log", "gpu_check_dry_layer.json",
                     "gpu_check_dry_train.json", "gpu_check_dry_packing.json"}  # a device run brings back 8 at most
    md = (out / "gpu_check.md").read_text()
    for name in STAGES:
        assert f"| {name} | PASS |" in md
    assert "#### Layer forward+backward (cpu, bfloat16)" in md and "#### Training throughput" in md
    assert "#### Packed vs padded training, 1 CPU rank" in md
    assert dry["new_results"] == set()  # benchmark results of a dry run stay in OUT
