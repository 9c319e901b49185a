"""The resume policy and the checkpoint messages (dude_dist/checkpoint.py), in process:
which checkpoint a run continues from, what it refuses, and the exact words of each refusal."""

from __future__ import annotations

import errno
import json
import logging
import re
import struct
from pathlib import Path

import pytest

from dude_dist import checkpoint as ckpt_lib
from dude_dist import comm
from dude_dist.config_loader import load_config
from dude_dist.errors import CheckpointError, ConfigError, DataError, TrainingError
from tests.helpers import ROOT

TINY = ROOT / "configs" / "tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _propagate(monkeypatch):
    monkeypatch.setattr(logging.getLogger("dude_dist"), "propagate", True)  # setup_logging turns it off


def cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def meta_of(config, step: int = 4, world_size: int = 2, **extra) -> dict:
    layout = {"micro_batch_size": 2, "grad_accum": 1, "global_batch_size": 4}
    return {"step": step, "fingerprint": ckpt_lib.fingerprint(config), "world_size": world_size, "layout": layout,
            **extra}


def folder(tmp_path: Path, portable: bool) -> Path:
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    if portable:
        (ckpt / ckpt_lib.TRAINABLE_FILE).write_bytes(b"")
    return ckpt


# --------------------------------------------------------------------------- check_compatible


def test_other_model_or_adapter_keys_are_refused_unless_forced(tmp_path):
    ckpt = folder(tmp_path, portable=True)
    meta = meta_of(cfg())
    now = cfg("adapter.rank=8")
    with pytest.raises(TrainingError, match=re.escape(
            f"refusing to resume from {ckpt}: adapter.rank: checkpoint 4 vs config 8 (pass --force-resume to "
            "override)")):
        ckpt_lib.check_compatible(ckpt, meta, now, 2)
    ckpt_lib.check_compatible(ckpt, meta, now, 2, force=True)
    assert ckpt_lib.fingerprint_differences(meta, now) == ["adapter.rank: checkpoint 4 vs config 8"]
    two = cfg("adapter.rank=8", "adapter.seed=5")
    with pytest.raises(TrainingError, match=re.escape(
            ": adapter.rank: checkpoint 4 vs config 8; adapter.seed: checkpoint 0 vs config 5 (pass --force-resume")):
        ckpt_lib.check_compatible(ckpt, meta, two, 2)
    assert ckpt_lib.fingerprint_differences({}, now) == []


def test_another_global_batch_is_refused_with_the_setting_to_use(tmp_path):
    ckpt = folder(tmp_path, portable=True)
    with pytest.raises(ConfigError, match=re.escape(
            f"checkpoint {ckpt} was trained with a global batch of 4 samples, this run has 8: the data order and "
            "the loss per step depend on it; set train.global_batch_size=4 (micro-batches, accumulation and "
            "ranks may change)")):
        ckpt_lib.check_compatible(ckpt, meta_of(cfg()), cfg("train.global_batch_size=8"), 2)
    ckpt_lib.check_compatible(ckpt, meta_of(cfg()), cfg("train.global_batch_size=8"), 2, force=True)
    ckpt_lib.check_compatible(ckpt, {**meta_of(cfg()), "layout": None}, cfg("train.global_batch_size=8"), 2)


def test_a_portable_checkpoint_resumes_on_another_world_size_and_says_how(tmp_path, caplog):
    ckpt = folder(tmp_path, portable=True)
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        ckpt_lib.check_compatible(ckpt, meta_of(cfg(), world_size=2), cfg(), 1)
    assert caplog.messages == [
        "resuming step_00000004 on another world size: written as micro 2 x accum 1 x 2 ranks, now micro 2 x "
        "accum 2 x 1 ranks (global batch 4 either way, so the same steps)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        ckpt_lib.check_compatible(ckpt, {**meta_of(cfg(), world_size=2), "layout": {"micro_batch_size": 1,
                                                                                    "grad_accum": 2}}, cfg(), 1)
    assert caplog.messages == [
        "resuming step_00000004 on another world size: written as micro 1 x accum 2 x 2 ranks, now micro 2 x "
        "accum 2 x 1 ranks (global batch 4 either way, so the same steps)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        ckpt_lib.check_compatible(ckpt, {**meta_of(cfg(), world_size=2), "layout": {"global_batch_size": 4}},
                                  cfg(), 1)
        ckpt_lib.check_compatible(ckpt, meta_of(cfg(), world_size=1), cfg(), 1)  # same size: nothing to say
    assert caplog.messages == [
        "resuming step_00000004 on another world size: written as 2 ranks, now micro 2 x accum 2 x 1 ranks "
        "(global batch 4 either way, so the same steps)"]


def test_deepspeed_only_checkpoints_resume_on_their_own_world_size_only(tmp_path):
    ckpt = folder(tmp_path, portable=False)
    ckpt_lib.check_compatible(ckpt, meta_of(cfg(), world_size=2), cfg(), 2)
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint {ckpt} was written by 2 rank(s) but this run has 1: it holds only DeepSpeed's optimizer "
            "files (an older dude_dist), split 2 ways, which cannot be resumed on another world size; resume with 2 "
            "rank(s) (the same world size works), or start over with --resume none")):
        ckpt_lib.check_compatible(ckpt, meta_of(cfg(), world_size=2), cfg(), 1)


@pytest.mark.parametrize("max_steps", [4, 3])
def test_a_run_that_already_reached_max_steps_has_nothing_to_do(tmp_path, max_steps):
    ckpt = folder(tmp_path, portable=True)
    with pytest.raises(ConfigError, match=re.escape(
            f"nothing to do: checkpoint {ckpt} is already at step 4 and train.max_steps={max_steps}; raise "
            "train.max_steps above 4 to train further, or pass --resume none to start over")):
        ckpt_lib.check_compatible(ckpt, meta_of(cfg()), cfg(f"train.max_steps={max_steps}"), 2)
    ckpt_lib.check_compatible(ckpt, meta_of(cfg()), cfg("train.max_steps=5"), 2)
    ckpt_lib.check_compatible(ckpt, meta_of(cfg()), cfg("train.max_steps=0", "train.epochs=1"), 2)


# --------------------------------------------------------------------------- select_checkpoint


class Engine:
    def save_checkpoint(self, save_dir, tag, **kwargs) -> None:
        import torch

        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(3)}}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")


def saved(root: Path, step: int, config) -> Path:
    return ckpt_lib.save_checkpoint(Engine(), root, step, meta_of(config, step=step, world_size=1), rank=0,
                                    keep_last=5)


def test_select_none_auto_and_a_folder(tmp_path):
    root, config = tmp_path / "checkpoints", cfg("train.max_steps=20")
    assert ckpt_lib.select_checkpoint(root, "none", config, 1) is None
    assert ckpt_lib.select_checkpoint(root, "auto", config, 1) is None  # nothing saved yet
    first, second = saved(root, 2, config), saved(root, 4, config)
    assert ckpt_lib.select_checkpoint(root, "auto", config, 1) == second
    assert ckpt_lib.select_checkpoint(root, str(first), config, 1) == first
    assert ckpt_lib.select_checkpoint(root, "none", config, 1) is None


@pytest.mark.parametrize(("resume", "message"), [
    ("Auto", "--resume Auto: write it in lower case (auto); a folder named 'Auto' does not exist"),
    ("NONE", "--resume NONE: write it in lower case (none); a folder named 'NONE' does not exist"),
    ("{root}/step_00000099", "--resume {root}/step_00000099: no such checkpoint folder (give a step_XXXXXXXX "
                             "folder, auto or none)"),
    ("{root}", "--resume {root}: {root} is not a complete checkpoint (no meta.json)"),
])
def test_select_names_what_is_wrong_with_the_resume_argument(tmp_path, resume, message):
    root = tmp_path / "checkpoints"
    saved(root, 2, cfg())
    with pytest.raises(TrainingError, match="^" + re.escape(message.format(root=root)) + "$"):
        ckpt_lib.select_checkpoint(root, resume.format(root=root), cfg(), 1)


def test_select_a_damaged_folder_is_an_error_and_auto_falls_back(tmp_path, caplog):
    root, config = tmp_path / "checkpoints", cfg()
    older, newer = saved(root, 2, config), saved(root, 4, config)
    (newer / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(
            f"--resume {newer}: checkpoint {newer} is damaged: meta.json has 1 bytes, the manifest records")):
        ckpt_lib.select_checkpoint(root, str(newer), config, 1)
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        assert ckpt_lib.select_checkpoint(root, "auto", config, 1) == older
    assert caplog.messages[0].startswith(f"checkpoint {newer} is damaged: meta.json has 1 bytes")
    assert caplog.messages[0].endswith("; falling back to the previous complete checkpoint")
    assert caplog.messages[1] == "using step_00000002: the 1 newer checkpoint(s) are damaged"
    only = tmp_path / "alone"
    alone = saved(only, 2, config)
    (alone / "meta.json").write_text("{")
    recorded = json.loads((alone / "manifest.json").read_text())["files"]["meta.json"]["size"]
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {alone} is damaged: meta.json has 1 bytes, the manifest records {recorded} (truncated or "
            f"overwritten); no usable checkpoint under {only} (--resume none starts over and moves these aside)")
            + "$"):
        ckpt_lib.newest_verified(only)
    (older / "meta.json").write_text("[")
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint {newer} is damaged: meta.json has 1 bytes") + ".*" + re.escape(
            f"; the 1 older checkpoint(s) are damaged too; no usable checkpoint under {root} (--resume none starts "
            "over and moves these aside)")):
        ckpt_lib.newest_verified(root)


# --------------------------------------------------------------------------- _on_rank0, as on several ranks


def _ranks(monkeypatch, rank: int, received=None):
    sent = []
    monkeypatch.setattr(comm, "is_active", lambda: True)
    monkeypatch.setattr(comm, "rank", lambda: rank)

    def broadcast(obj, src):
        assert src == 0
        sent.append(obj)
        return obj if rank == 0 else received

    monkeypatch.setattr(comm, "broadcast_object", broadcast)
    return sent


def test_rank0_answers_for_every_rank(monkeypatch):
    sent = _ranks(monkeypatch, 0)
    assert ckpt_lib._on_rank0(lambda: "step_4") == "step_4"
    assert sent == [("ok", "step_4")]
    sent.clear()
    with pytest.raises(ConfigError, match="^bad key$"):
        ckpt_lib._on_rank0(lambda: (_ for _ in ()).throw(ConfigError("bad key")))
    assert sent == [("error", "ConfigError", "bad key")]
    sent.clear()
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback on rank 0; the others get one line
        ckpt_lib._on_rank0(lambda: 1 / 0)
    assert sent == [("error", "CheckpointError", "rank 0 failed while checking the checkpoint (its traceback says "
                                                 "why)")]


@pytest.mark.parametrize(("box", "cls"), [(("error", "TrainingError", "m"), TrainingError),
                                          (("error", "ConfigError", "m"), ConfigError),
                                          (("error", "CheckpointError", "m"), CheckpointError),
                                          (("error", "DataError", "m"), CheckpointError)])
def test_other_ranks_raise_rank0s_error(monkeypatch, box, cls):
    sent = _ranks(monkeypatch, 1, received=box)
    called = []
    with pytest.raises(cls, match="^m$") as info:
        ckpt_lib._on_rank0(lambda: called.append(1))
    assert type(info.value) is cls and not called and sent == [None]
    assert DataError  # (a DataError from rank 0 arrives as a CheckpointError: not a checkpoint class)


def test_other_ranks_return_rank0s_answer(monkeypatch):
    _ranks(monkeypatch, 3, received=("ok", None))
    assert ckpt_lib._on_rank0(lambda: "never run here") is None


# --------------------------------------------------------------------------- messages


def test_a_full_disk_is_named_with_the_free_space_and_what_was_kept(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    partial = root / "step_00000006.partial"
    partial.mkdir(parents=True)
    monkeypatch.setattr(ckpt_lib, "_free_bytes", lambda path: 5 * 2**20)
    exc = OSError(errno.ENOSPC, "No space left on device", str(partial / "x.safetensors"))
    assert ckpt_lib._write_failure(partial, exc) == (
        f"no space left on device (ENOSPC) writing checkpoint {partial / 'x.safetensors'} (5.0 MiB free; [Errno 28] "
        "No space left on device: '" + str(partial / "x.safetensors") + "'); the unfinished step_00000006.partial "
        "was removed and no earlier checkpoint exists; free space, then resume with --resume auto")
    # torch's writer only says "unexpected pos": little free space decides
    assert ckpt_lib._write_failure(partial, RuntimeError("unexpected pos 64 vs 12")).startswith(
        f"no space left on device (ENOSPC) writing checkpoint {partial} (5.0 MiB free; unexpected pos 64 vs 12)")
    monkeypatch.setattr(ckpt_lib, "_free_bytes", lambda path: None)
    assert "(free space unknown; safetensors: os error 28)" in ckpt_lib._write_failure(
        partial, RuntimeError("safetensors: os error 28"))
    for exc in (OSError(errno.ENOSPC, ""), RuntimeError("write failed: No space left on device")):
        assert ckpt_lib._write_failure(partial, exc).startswith("no space left on device (ENOSPC)"), exc
    monkeypatch.setattr(ckpt_lib, "_free_bytes", lambda path: ckpt_lib._DISK_FULL_BYTES)  # just enough: not full
    assert ckpt_lib._write_failure(partial, RuntimeError("x" * 400)) == (
        f"could not write checkpoint {partial}: RuntimeError: {'x' * 300}; the unfinished step_00000006.partial was "
        "removed and no earlier checkpoint exists")
    monkeypatch.setattr(ckpt_lib, "_free_bytes", lambda path: 10 * 2**30)
    saved(root, 2, cfg())
    assert ckpt_lib._write_failure(partial, PermissionError(13, "Permission denied")) == (
        f"could not write checkpoint {partial}: PermissionError: [Errno 13] Permission denied; the unfinished "
        f"step_00000006.partial was removed and the newest complete checkpoint is still {root / 'step_00000002'}")
    assert ckpt_lib._write_failure(partial, RuntimeError("")) == (
        f"could not write checkpoint {partial}: RuntimeError: RuntimeError; the unfinished step_00000006.partial "
        f"was removed and the newest complete checkpoint is still {root / 'step_00000002'}")


def test_free_bytes_asks_the_nearest_existing_folder(tmp_path):
    assert ckpt_lib._free_bytes(tmp_path / "a" / "b" / "c") == pytest.approx(ckpt_lib._free_bytes(tmp_path),
                                                                             rel=0.01)


def test_the_restricted_unpickler_verdict_in_a_few_words():
    exc = RuntimeError("Weights only load failed. ...\nPlease file an issue\nUnsupported global: GLOBAL os.system "
                       "was not an allowed global")
    assert ckpt_lib._unpickling_problem(exc) == (
        "it names 'os.system', which is not a tensor, a container or a DeepSpeed data class")
    exc = RuntimeError("Weights only load failed. boilerplate\nPlease file an issue with this\nCheck the documentation of "
                       "torch.load\n\n  invalid load key, 'x'.  \n")
    assert ckpt_lib._unpickling_problem(exc) == "it is not a weights-only torch file (invalid load key, 'x'.)"
    assert ckpt_lib._unpickling_problem(ValueError("")) == "it is not a weights-only torch file (ValueError)"
    assert ckpt_lib._unpickling_problem(ValueError("y" * 300)) == f"it is not a weights-only torch file ({'y' * 200})"


def _safetensors(path: Path, header: object, data: bytes, claim: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claim is None else claim) + raw + data)
    return path


def test_what_is_wrong_with_a_safetensors_file(tmp_path):
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"x": "y"}}
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "ok", good, b"\0" * 8)) is None
    short = tmp_path / "short"
    short.write_bytes(b"\1\2\3")
    assert ckpt_lib.safetensors_problem(short) == "3 bytes, shorter than a safetensors header"
    raw_len = len(json.dumps(good).encode())
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "claim", good, b"\0" * 8, claim=10**6)) == (
        f"its header claims 1000000 bytes but the file has {8 + raw_len + 8}")
    bad = tmp_path / "bad"
    bad.write_bytes(struct.pack("<Q", 3) + b"{x]")
    assert ckpt_lib.safetensors_problem(bad) == "its header is not valid JSON"
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "list", [1], b"")) == "its header is not a JSON object"
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "cut", good, b"\0" * 5)) == (
        f"{8 + raw_len + 5} bytes where its header needs {8 + raw_len + 8} (truncated or padded)")
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "pad", good, b"\0" * 9)) == (
        f"{8 + raw_len + 9} bytes where its header needs {8 + raw_len + 8} (truncated or padded)")
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "empty", {}, b"")) is None
    assert ckpt_lib.safetensors_problem(tmp_path / "missing").startswith("cannot be read ([Errno 2] No such file")
    huge = tmp_path / "huge"
    huge.write_bytes(b"\xff" * 8 + b"{}")
    assert ckpt_lib.safetensors_problem(huge) == "its header claims 18446744073709551615 bytes but the file has 10"
    nearly = tmp_path / "nearly"
    nearly.write_bytes(struct.pack("<Q", 5) + b"{}{}")  # claims one byte more than there is
    assert ckpt_lib.safetensors_problem(nearly) == "its header claims 5 bytes but the file has 12"
    meta = {**good, "__metadata__": {"data_offsets": [0, 999]}, "note": "data_offsets"}  # not tensors
    assert ckpt_lib.safetensors_problem(_safetensors(tmp_path / "meta", meta, b"\0" * 8)) is None
