"""Damaged checkpoints, a full disk during a save, and the resume policy
(dude_dist/checkpoint.py): nothing lost, nothing silent.

A checkpoint records the size and sha256 of every file (``manifest.json``); before a
resume, export or evaluation loads one, :func:`verify_checkpoint` names the first damaged
file. ``--resume auto`` then falls back to the previous complete checkpoint with a
warning; ``--resume <dir>`` stops with one ``error:`` line. A save that fails (ENOSPC)
removes its ``.partial`` folder and leaves ``latest`` on the previous checkpoint.

Most cases run on checkpoints that a stand-in DeepSpeed engine writes (fast); the
``slow`` ones go through ``launch/train.py`` end to end.

    OMP_NUM_THREADS=1 python -m pytest tests/reliability/test_checkpoint_integrity.py -q
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dude_dist import checkpoint as ckpt_lib
from dude_dist.config_loader import load_config
from dude_dist.errors import CheckpointError, ConfigError, TrainingError
from tests.helpers import ROOT, summary, train

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
PARAMS = "dude_params.safetensors"


class FakeEngine:
    """Writes what DeepSpeed's ``save_checkpoint`` writes for one ZeRO-3 rank (plain tensors)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest=False, exclude_frozen_parameters=True) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.arange(4000, dtype=torch.float32)}}, folder / MODEL_STATES)
        if self.fail is not None:  # the disk fills up half-way through the optimizer file
            (folder / OPTIM).write_bytes(b"PK\x03\x04" + b"\0" * 100)
            raise self.fail
        torch.save({"optimizer_state_dict": {"exp_avg": torch.linspace(0, 1, 8000)}}, folder / OPTIM)


def write_params(folder: Path) -> None:
    save_file({"layers.0.q_proj.lora_a": torch.linspace(-1, 1, 4096).reshape(64, 64)}, str(folder / PARAMS))


def save(root: Path, step: int, engine=None, world_size: int = 1, **meta) -> Path:
    cfg = tiny_cfg()
    meta = {"fingerprint": ckpt_lib.fingerprint(cfg), "world_size": world_size, **meta}
    return ckpt_lib.save_checkpoint(engine or FakeEngine(), root, step, meta, rank=0, keep_last=5,
                                    write_extra=write_params)


def tiny_cfg(*overrides: str):
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", list(overrides))


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    save(root, 2)
    save(root, 4)
    return root


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_offset(path: Path) -> int:
    """An offset inside the tensor data of a safetensors file (past its JSON header)."""
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    return 8 + header_len + 1000


# Each damage: (what to do to the newest checkpoint, the file the message must name).
DAMAGE = {
    "optim_truncated": (lambda d: os.truncate(d / OPTIM, 20000), OPTIM),
    "model_states_deleted": (lambda d: (d / MODEL_STATES).unlink(), MODEL_STATES),
    "meta_truncated": (lambda d: os.truncate(d / "meta.json", 40), "meta.json"),
    "params_truncated": (lambda d: os.truncate(d / PARAMS, (d / PARAMS).stat().st_size - 100), PARAMS),
    "params_bit_flipped": (lambda d: flip_byte(d / PARAMS, tensor_offset(d / PARAMS)), PARAMS),
    "optim_bit_flipped": (lambda d: flip_byte(d / OPTIM, (d / OPTIM).stat().st_size // 2), OPTIM),
}


# --------------------------------------------------------------------------- the manifest


def test_save_records_size_and_sha256_of_every_file(two_checkpoints):
    import hashlib

    ckpt = two_checkpoints / "step_00000004"
    manifest = json.loads((ckpt / ckpt_lib.MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != ckpt_lib.MANIFEST)
    assert sorted(manifest) == on_disk == sorted(["meta.json", "rng_rank0.pt", MODEL_STATES, OPTIM, PARAMS])
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert ckpt_lib.verify_checkpoint(ckpt)["step"] == 4


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file_is_named_and_auto_falls_back(two_checkpoints, damage, caplog):
    do, name = DAMAGE[damage]
    newest = two_checkpoints / "step_00000004"
    do(newest)
    with pytest.raises(CheckpointError) as info:  # never an OSError or a JSONDecodeError
        ckpt_lib.verify_checkpoint(newest)
    assert str(newest) in str(info.value) and name in str(info.value), str(info.value)

    with caplog.at_level(logging.WARNING, logger="dude_dist.checkpoint"):
        chosen = ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg(), world_size=1)
    assert chosen == two_checkpoints / "step_00000002"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(name in m and "falling back" in m for m in warned), warned

    with pytest.raises(CheckpointError, match=rf"^--resume {re.escape(str(newest))}: .*{re.escape(name)}"):
        ckpt_lib.select_checkpoint(two_checkpoints, str(newest), tiny_cfg(), world_size=1)


def test_every_checkpoint_damaged_is_one_error_naming_the_newest(two_checkpoints):
    for step in (2, 4):
        os.truncate(two_checkpoints / ckpt_lib.step_tag(step) / OPTIM, 100)
    with pytest.raises(CheckpointError, match=r"step_00000004 is damaged: .*optim_states.pt has 100 bytes.*"
                                              r"1 older checkpoint\(s\) are damaged too; no usable checkpoint"):
        ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg(), world_size=1)


@pytest.mark.parametrize("damage", ["optim_truncated", "params_truncated", "meta_truncated"])
def test_checkpoint_without_manifest_loads_and_is_still_checked(two_checkpoints, damage):
    """A checkpoint written before manifests existed: what can be checked is checked."""
    for step in (2, 4):
        (two_checkpoints / ckpt_lib.step_tag(step) / ckpt_lib.MANIFEST).unlink()
    newest = two_checkpoints / "step_00000004"
    assert ckpt_lib.verify_checkpoint(newest)["step"] == 4
    assert ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg(), world_size=1) == newest
    do, name = DAMAGE[damage]
    do(newest)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        ckpt_lib.verify_checkpoint(newest)
    assert ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg(), world_size=1).name == "step_00000002"


def test_verify_checkpoint_files_never_raises_oserror(two_checkpoints):
    """A truncated torch file makes torch's mmap fail with OSError(EINVAL)."""
    victim = two_checkpoints / "step_00000004" / OPTIM
    os.truncate(victim, 20000)
    with pytest.raises(CheckpointError, match=re.escape(OPTIM)):
        ckpt_lib.verify_checkpoint_files(victim.parent)


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 22336 vs 22224"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_disk_full_during_save_is_named_and_keeps_latest(two_checkpoints, monkeypatch, error):
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(CheckpointError) as info:
        save(two_checkpoints, 6, engine=FakeEngine(fail=error))
    message = str(info.value)
    assert "no space left on device (ENOSPC)" in message and str(two_checkpoints / "step_00000006.partial") in message
    assert "the newest complete checkpoint is still" in message and "step_00000004" in message, message
    assert not (two_checkpoints / "step_00000006.partial").exists()
    assert not (two_checkpoints / "step_00000006").exists()
    assert (two_checkpoints / "latest").read_text() == "step_00000004"
    assert ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg("train.max_steps=8"),
                                      world_size=1).name == "step_00000004"


def test_failed_safetensors_write_is_one_error_with_the_path(two_checkpoints):
    def full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / PARAMS))

    with pytest.raises(CheckpointError, match=r"no space left on device \(ENOSPC\) writing checkpoint .*"
                                              r"step_00000006.partial/dude_params.safetensors"):
        ckpt_lib.save_checkpoint(FakeEngine(), two_checkpoints, 6, {"world_size": 1}, rank=0, keep_last=5,
                                 write_extra=full)
    assert not (two_checkpoints / "step_00000006.partial").exists()
    assert (two_checkpoints / "latest").read_text() == "step_00000004"


# --------------------------------------------------------------------------- the resume policy


def test_resume_policy_lives_in_checkpoint_module():
    import dude_dist.trainer as trainer

    assert not hasattr(trainer, "RESUME_KEYS") and not hasattr(trainer, "_lookup")
    assert "adapter.rank" in ckpt_lib.RESUME_KEYS
    fp = ckpt_lib.fingerprint(tiny_cfg("adapter.rank=8"))
    assert fp["adapter.rank"] == 8 and fp["model.name_or_path"] == "../shared/models/stories260K"
    assert set(fp) == set(ckpt_lib.RESUME_KEYS)


def test_changed_adapter_key_is_refused_unless_forced(two_checkpoints):
    with pytest.raises(TrainingError, match=r"refusing to resume from .*step_00000004: adapter.rank: checkpoint 4 "
                                            r"vs config 2 \(pass --force-resume to override\)"):
        ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg("adapter.rank=2"), world_size=1)
    forced = ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg("adapter.rank=2"), world_size=1, force=True)
    assert forced.name == "step_00000004"


def test_other_world_size_is_refused_naming_both(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 4, world_size=2)
    with pytest.raises(CheckpointError) as info:
        ckpt_lib.select_checkpoint(root, "auto", tiny_cfg(), world_size=1, force=True)
    message = str(info.value)
    assert "written by 2 rank(s) but this run has 1" in message, message
    assert "the same world size works" in message
    assert ckpt_lib.select_checkpoint(root, "auto", tiny_cfg(), world_size=2).name == "step_00000004"


@pytest.mark.parametrize("max_steps", [2, 4])
def test_max_steps_at_or_below_checkpoint_is_nothing_to_do(two_checkpoints, max_steps):
    with pytest.raises(ConfigError, match=rf"nothing to do: checkpoint .*step_00000004 is already at step 4 and "
                                          rf"train.max_steps={max_steps}; raise train.max_steps above 4"):
        ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg(f"train.max_steps={max_steps}"), world_size=1)
    assert ckpt_lib.select_checkpoint(two_checkpoints, "auto", tiny_cfg("train.max_steps=5"), world_size=1)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, holding DeepSpeed's own files
    beside the portable state (both are checked before a resume)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(out, "train.max_steps=4", "train.save_every=2", "train.keep_last=5", "train.deepspeed_checkpoint=true",
          timeout=300)
    return out


def legacy(ckpt: Path) -> None:
    """Make ``ckpt`` what an older dude_dist wrote: DeepSpeed's files only, no portable state."""
    for name in (ckpt_lib.TRAINABLE_FILE, ckpt_lib.RNG_FILE, ckpt_lib.STATE_FILE):
        (ckpt / name).unlink()
    ckpt_lib.write_manifest(ckpt)


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # (a progress bar may still hold the line: the error need not start it)
    lines = re.findall(r"error: .*$", proc.stderr, re.MULTILINE)
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_train_resume_auto_falls_back_past_a_damaged_checkpoint(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    newest = out / "checkpoints" / "step_00000004"
    os.truncate(newest / OPTIM, 20000)

    explicit = train(out, "train.max_steps=6", "train.save_every=2", resume=str(newest), check=False, timeout=180)
    line = one_error(explicit)
    assert OPTIM in line and str(newest) in line, line
    assert "init plan" not in explicit.stderr  # refused before the model loaded

    auto = train(out, "train.max_steps=6", "train.save_every=2", resume="auto", timeout=300)
    assert re.search(rf"step_00000004 is damaged: {OPTIM} has 20000 bytes.*falling back", auto.stderr), \
        auto.stderr[-3000:]
    assert summary(out)["start_step"] == 2 and summary(out)["end_step"] == 6


@pytest.mark.slow
def test_train_refuses_other_world_size_and_finished_runs_before_the_model(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    newest = out / "checkpoints" / "step_00000004"
    done = one_error(train(out, "train.max_steps=4", resume="auto", check=False, timeout=180))
    assert "nothing to do" in done and "at step 4 and train.max_steps=4" in done, done

    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    legacy(newest)  # DeepSpeed's optimizer files alone are bound to the world size that wrote them
    proc = train(out, "train.max_steps=8", resume="auto", check=False, timeout=180)
    line = one_error(proc)
    assert "written by 2 rank(s) but this run has 1" in line, line
    assert "init plan" not in proc.stderr and "trainable parameters" not in proc.stderr


@pytest.mark.slow
def test_train_disk_full_during_save_keeps_the_previous_checkpoint(trained, tmp_path):
    """A real full disk: a small tmpfs holding the run (needs root to mount it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; test_disk_full_during_save_is_named_and_keeps_latest covers it")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        out = mnt / "run"
        shutil.copytree(trained, out, ignore=shutil.ignore_patterns("tensorboard", "step_00000004"))
        (out / "checkpoints" / "latest").write_text("step_00000002")
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # leave ~48 KiB: enough for logs, not for a ~120 KiB checkpoint
            free = shutil.disk_usage(mnt).free
            f.write(b"\0" * max(0, free - 48 * 1024))
        proc = train(out, "train.max_steps=4", "train.save_every=2", resume="auto", check=False, timeout=300)
        line = one_error(proc)
        assert "no space left on device (ENOSPC)" in line and "step_00000004.partial" in line, line
        assert not (out / "checkpoints" / "step_00000004.partial").exists()
        assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
        filler.unlink()
        train(out, "train.max_steps=4", "train.save_every=2", resume="auto", timeout=300)
        assert summary(out)["start_step"] == 2 and (out / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
