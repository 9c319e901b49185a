"""Security: what a run writes and reads cannot run code (dude_dist/checkpoint.py, config.py,
models.py). Weights and factor caches are safetensors; pickles are read only by torch's
restricted unpickler; YAML only through ``safe_load``; no remote model code unless asked;
no eval/exec anywhere in the package.

    OMP_NUM_THREADS=1 python -m pytest tests/reliability/test_security.py -q
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import PY, ROOT, run, train

PACKAGE_SOURCES = sorted((ROOT / "dude_dist").glob("*.py")) + sorted((ROOT / "launch").glob("*.py"))
STORIES = ROOT.parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint."""
    out = tmp_path_factory.mktemp("security") / "run"
    train(out, "train.max_steps=2", "train.save_every=2", timeout=300)
    return out


class Payload:
    """Unpickling this creates ``marker``: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_payload(path: Path, marker: Path, form: str) -> None:
    if form == "raw_pickle":
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # torch's legacy format is pickle 2
    else:
        torch.save({"optimizer_state_dict": Payload(marker)}, path)


# --------------------------------------------------------------------------- files a run writes


@pytest.mark.slow
def test_a_run_writes_no_pickle(trained):
    init_files = sorted(p.name for p in (trained / "dude_init").iterdir())
    assert init_files == ["factors.safetensors", "key.json"], init_files
    ckpt = trained / "checkpoints" / "step_00000002"
    assert (ckpt / "trainable.safetensors").is_file() and (ckpt / "dude_params.safetensors").is_file()
    pickled = sorted(p.relative_to(trained).as_posix() for p in trained.rglob("*")
                     if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"))
    assert pickled == [], pickled
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}


def _consistent(ckpt: Path) -> None:
    """Record the planted file in the manifest, as an attacker who rewrites it would."""
    from dude_dist.checkpoint import write_manifest

    write_manifest(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["raw_pickle", "torch_zip"])
def test_a_pickle_in_a_portable_checkpoint_is_refused_unread(trained, tmp_path, form):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpt = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    _write_payload(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, form)
    _consistent(ckpt)
    proc = train(out, "train.max_steps=4", "train.save_every=2", resume="auto", check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"error: refusing to load checkpoint {ckpt}: it holds the portable state, which is safetensors and "
            "JSON only, but also zero_pp_rank_0_mp_rank_00_optim_states.pt") in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the planted pickle ran"
    assert "init plan" not in proc.stderr  # refused before the model was even loaded


@pytest.mark.slow
@pytest.mark.parametrize("form", ["raw_pickle", "torch_zip"])
def test_tampered_deepspeed_checkpoint_is_refused_and_nothing_runs(tmp_path, form):
    """An older checkpoint (DeepSpeed's pickled files only) still passes the restricted
    unpickler before DeepSpeed's unrestricted load could run anything."""
    from dude_dist import checkpoint as ckpt_lib

    out = tmp_path / "run"
    train(out, "train.max_steps=2", "train.save_every=2", "train.deepspeed_checkpoint=true", timeout=300)
    ckpt = out / "checkpoints" / "step_00000002"
    for name in (ckpt_lib.TRAINABLE_FILE, ckpt_lib.RNG_FILE, ckpt_lib.STATE_FILE):
        (ckpt / name).unlink()
    victim = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    _write_payload(victim, marker, form)
    _consistent(ckpt)
    # The payload is live: an unrestricted load (what DeepSpeed's load_checkpoint does) runs it.
    probe, live_marker = tmp_path / "probe.pt", tmp_path / "pwned_probe"
    _write_payload(probe, live_marker, form)
    subprocess.run([PY, "-c", f"import torch; torch.load({str(probe)!r}, weights_only=False)"], timeout=120,
                   capture_output=True)
    assert live_marker.exists(), "the payload does not work, so this test would prove nothing"

    proc = train(out, "train.max_steps=4", "train.save_every=2", resume="auto", check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"error: refusing to load checkpoint {ckpt}: " \
           f"zero_pp_rank_0_mp_rank_00_optim_states.pt: it names 'posix.system'" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the tampered checkpoint ran its payload"
    assert "init plan" not in proc.stderr  # refused before the model was even loaded


# --------------------------------------------------------------------------- config and model code


@pytest.mark.slow
def test_yaml_python_tags_are_rejected_and_not_run(tmp_path):
    marker_yaml, marker_set = tmp_path / "pwned_yaml", tmp_path / "pwned_set"
    config = tmp_path / "evil.yaml"
    config.write_text((ROOT / "configs" / "tiny_cpu.yaml").read_text().replace(
        "output_dir: runs/tiny_cpu", f'output_dir: !!python/object/apply:os.system ["touch {marker_yaml}"]'))
    line = config.read_text().splitlines().index(
        f'output_dir: !!python/object/apply:os.system ["touch {marker_yaml}"]') + 1
    cmds = [
        [PY, "launch/train.py", "--config", str(config)],
        [PY, "launch/train.py", "--config", "configs/tiny_cpu.yaml", "--set", f"output_dir={tmp_path / 'run'}",
         "--set", f'train.max_steps=!!python/object/apply:os.system ["touch {marker_set}"]'],
    ]
    with ThreadPoolExecutor(2) as pool:
        from_yaml, from_set = pool.map(lambda cmd: run(cmd, timeout=120, check=False), cmds)
    assert from_yaml.returncode == 2 and "Traceback" not in from_yaml.stderr, from_yaml.stderr[-3000:]
    assert f"error: {config}:{line}: YAML syntax error: could not determine a constructor for the tag " \
           "'tag:yaml.org,2002:python/object/apply:os.system'" in from_yaml.stderr, from_yaml.stderr[-3000:]
    # A --set value is parsed with safe_load too; the tag stays text, which is not an integer.
    assert from_set.returncode == 2 and "error: --set: train.max_steps: expected an integer" in from_set.stderr
    assert not marker_yaml.exists() and not marker_set.exists()


@pytest.mark.slow
def test_remote_model_code_is_not_run_unless_trusted(tmp_path):
    model = tmp_path / "remote_code_model"
    model.mkdir()
    marker = tmp_path / "pwned"
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, model / name)
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil_llm", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (model / "configuration_evil.py").write_text(code + "from transformers import PretrainedConfig\n"
                                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_llm'\n")
    (model / "modeling_evil.py").write_text(code)
    proc = train(tmp_path / "run", f"model.name_or_path={model}", "train.max_steps=1", check=False, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: model.name_or_path '{model}'" in proc.stderr and "trust_remote_code" in proc.stderr, \
        proc.stderr[-3000:]
    assert not marker.exists(), "remote model code ran without model.trust_remote_code"


def test_trust_remote_code_is_off_by_default():
    from dude_dist.config import ModelConfig

    assert ModelConfig(name_or_path="x").trust_remote_code is False


# --------------------------------------------------------------------------- the source itself


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                f"{getattr(func.value, 'id', '?')}.{func.attr}" if isinstance(func, ast.Attribute) else "?")
            yield node, name


def test_source_has_no_code_execution_on_data():
    """No eval/exec, no unrestricted unpickling, no unsafe YAML, no shell, no forced remote code."""
    forbidden = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.loads",
                 "yaml.load", "yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen"}
    problems = []
    for path in PACKAGE_SOURCES:
        for node, name in _calls(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name in forbidden:
                problems.append(f"{where}: {name}()")
            if name == "torch.load":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            shell = keywords.get("shell")
            if isinstance(shell, ast.Constant) and shell.value is True:
                problems.append(f"{where}: subprocess with shell=True")
            trust = keywords.get("trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                problems.append(f"{where}: trust_remote_code=True")
    assert not problems, problems
    # The scan sees calls written as attribute access on a module and as bare names.
    assert sum(1 for p in PACKAGE_SOURCES for _, n in _calls(ast.parse(p.read_text())) if n == "torch.load") >= 2
