"""What a checkpoint save writes and what verification refuses (dude_dist/checkpoint.py), in
process and word for word: the DeepSpeed call, meta.json and manifest.json as written, the
commit and its failures, the legacy load, and each damage message."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from dude_dist import checkpoint as ckpt_lib
from dude_dist.config import batch_layout
from dude_dist.config_loader import load_config
from dude_dist.errors import CheckpointError
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def _propagate(monkeypatch):
    monkeypatch.setattr(logging.getLogger("dude_dist"), "propagate", True)  # setup_logging turns it off


class RecordingEngine:
    """Records DeepSpeed's save/load calls; writes one model-states file and a nested one."""

    def __init__(self, loads: bool = True) -> None:
        self.calls: list[tuple] = []
        self.loads = loads

    def save_checkpoint(self, *args, **kwargs) -> None:
        self.calls.append(("save", args, kwargs))
        folder = Path(args[0]) / kwargs["tag"]
        (folder / "zero").mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(2)}}, folder / "mp_rank_00_model_states.pt")
        (folder / "zero" / "part.txt").write_text("nested")

    def load_checkpoint(self, *args, **kwargs):
        self.calls.append(("load", args, kwargs))
        return (str(Path(args[0]) / kwargs["tag"]), {}) if self.loads else (None, None)


def save(root: Path, step: int, engine=None, **kw) -> Path:
    return ckpt_lib.save_checkpoint(engine or RecordingEngine(), root, step, {"world_size": 1, "b": [1, 2]}, rank=0,
                                    keep_last=5, **kw)


# --------------------------------------------------------------------------- the save


def test_the_save_calls_deepspeed_once_and_writes_meta_and_manifest_as_specified(tmp_path, caplog):
    engine, seen = RecordingEngine(), []
    with caplog.at_level(logging.INFO, logger="dude_dist"):
        final = save(tmp_path, 3, engine, write_extra=seen.append)
    assert final == tmp_path / "step_00000003" and seen == [tmp_path / "step_00000003.partial"]
    assert engine.calls == [("save", (str(tmp_path),), {"tag": "step_00000003.partial", "save_latest": False,
                                                         "exclude_frozen_parameters": True})]
    assert (final / "meta.json").read_text() == json.dumps({"step": 3, "world_size": 1, "b": [1, 2]}, indent=1,
                                                            sort_keys=True)
    files = {}
    for name in ("meta.json", "mp_rank_00_model_states.pt", "rng_rank0.pt", "zero/part.txt"):
        data = (final / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert (final / "manifest.json").read_text() == json.dumps({"version": 1, "files": files}, indent=1,
                                                                sort_keys=True)
    assert (tmp_path / "latest").read_text() == "step_00000003"
    assert f"checkpoint saved: {final}" in caplog.messages


def test_the_manifest_leaves_out_itself_and_temporary_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    (tmp_path / "b.json.tmp123").write_text("x")
    (tmp_path / "manifest.json").write_text("old")
    assert ckpt_lib.write_manifest(tmp_path) == {"version": 1, "files": {
        "a.bin": {"size": 5, "sha256": hashlib.sha256(b"12345").hexdigest()}}}


def test_an_interrupted_save_of_the_same_step_is_replaced(tmp_path):
    (tmp_path / "step_00000004.partial").mkdir(parents=True)
    (tmp_path / "step_00000004.partial" / "junk").write_text("from a killed save")
    first = save(tmp_path, 4)
    (first / "extra").write_text("left from an earlier save of this step")
    again = save(tmp_path, 4)
    assert again == first and not (again / "junk").exists() and not (again / "extra").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004"]


def test_a_failed_commit_removes_the_partial_folder_and_keeps_latest(tmp_path, monkeypatch):
    save(tmp_path, 2)
    real = os.replace

    def refuse(src, dst):
        if str(src).endswith(".partial"):
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(ckpt_lib.os, "replace", refuse)
    monkeypatch.setattr(ckpt_lib, "_free_bytes", lambda path: 10 * 2**30)
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"could not write checkpoint {tmp_path / 'step_00000004.partial'}: PermissionError: [Errno 13] Permission "
            f"denied; the unfinished step_00000004.partial was removed and the newest complete checkpoint is still "
            f"{tmp_path / 'step_00000002'}") + "$"):
        save(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
    assert (tmp_path / "latest").read_text() == "step_00000002"


def test_a_latest_that_cannot_be_written_leaves_a_complete_checkpoint_found_anyway(tmp_path, monkeypatch, caplog):
    real = ckpt_lib.write_text_atomic

    def no_latest(path, text):
        if path.name == "latest":
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(ckpt_lib, "write_text_atomic", no_latest)
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        final = save(tmp_path, 5)
    assert caplog.messages == [f"checkpoint {final} is complete but {tmp_path / 'latest'} could not be updated: "
                               "[Errno 28] No space left on device"]
    assert ckpt_lib.find_resume(tmp_path) == final


def test_latest_naming_an_unfinished_folder_is_said_and_passed_over(tmp_path, caplog):
    good = save(tmp_path, 2)
    (tmp_path / "step_00000004.partial").mkdir()
    (tmp_path / "latest").write_text("step_00000004.partial\n")
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        assert ckpt_lib.resume_candidates(tmp_path) == [good]
    assert caplog.messages == [f"{tmp_path / 'latest'} names step_00000004.partial, which is incomplete; looking for "
                               "another"]


def test_run_meta_records_what_a_resume_checks():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["train.deepspeed_checkpoint=true"])
    layout = batch_layout(cfg.train, 2)
    meta = ckpt_lib.run_meta(cfg, layout, 2, 7)
    assert meta["fingerprint"] == ckpt_lib.fingerprint(cfg) and meta["config"]["adapter"]["rank"] == cfg.adapter.rank
    assert {k: v for k, v in meta.items() if k not in ("fingerprint", "config")} == {
        "samples_seen": 7 * layout.global_batch_size, "world_size": 2, "deepspeed_files": True,
        "layout": {"micro_batch_size": layout.micro_batch_size, "grad_accum": layout.grad_accum,
                   "global_batch_size": layout.global_batch_size}}


# --------------------------------------------------------------------------- the legacy load


def test_a_deepspeed_checkpoint_loads_through_deepspeed_with_these_options(tmp_path):
    ckpt = save(tmp_path, 3)
    engine = RecordingEngine()
    assert ckpt_lib.load_checkpoint(engine, ckpt, rank=0)["step"] == 3
    assert engine.calls == [("load", (str(tmp_path),), {"tag": "step_00000003", "load_module_strict": False,
                                                        "load_optimizer_states": True,
                                                        "load_lr_scheduler_states": True})]
    with pytest.raises(CheckpointError, match=f"^DeepSpeed could not load checkpoint {re.escape(str(ckpt))}$"):
        ckpt_lib.load_checkpoint(RecordingEngine(loads=False), ckpt, rank=0)
    (ckpt / "rng_rank1.pt").unlink(missing_ok=True)
    ckpt_lib.load_checkpoint(RecordingEngine(), ckpt, rank=1)  # no RNG file of that rank: nothing to restore


def test_set_rng_state_skips_a_cuda_state_without_cuda():
    state = ckpt_lib.rng_state()
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)
    expected = torch.rand(3)
    ckpt_lib.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected) or not torch.cuda.is_available()


# --------------------------------------------------------------------------- verification


def portable(tmp_path: Path, **meta) -> Path:
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(ckpt / ckpt_lib.TRAINABLE_FILE))
    save_file({"rank0.torch": torch.get_rng_state()}, str(ckpt / ckpt_lib.RNG_FILE))
    (ckpt / ckpt_lib.STATE_FILE).write_text("{}")
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, **meta}))
    ckpt_lib.write_manifest(ckpt)
    return ckpt


def test_a_portable_checkpoint_with_a_pickle_is_refused_unless_deepspeed_wrote_it(tmp_path):
    ckpt = portable(tmp_path)
    assert ckpt_lib.verify_checkpoint(ckpt)["step"] == 2
    (ckpt / "b.bin").write_bytes(b"x")
    (ckpt / "a.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"refusing to load checkpoint {ckpt}: it holds the portable state, which is safetensors and JSON only, "
            "but also a.pt, b.bin (a pickle can run code; nothing was read)") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "deepspeed_files": True}))
    ckpt_lib.write_manifest(ckpt)
    assert ckpt_lib.verify_checkpoint(ckpt)["deepspeed_files"] is True
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(ckpt))} is damaged: manifest.json is "
                                              "missing$"):
        ckpt_lib.verify_checkpoint(ckpt)


@pytest.mark.parametrize("missing", [["state.json"], ["rng.safetensors", "state.json"]])
def test_a_portable_checkpoint_names_its_missing_files(tmp_path, missing):
    ckpt = portable(tmp_path)
    for name in missing:
        (ckpt / name).unlink()
    ckpt_lib.write_manifest(ckpt)
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {ckpt} is damaged: {', '.join(missing)} missing") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)


def test_an_old_checkpoint_without_manifest_needs_deepspeed_files_and_says_what_is_unchecked(tmp_path, caplog):
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {ckpt} is damaged: it has no DeepSpeed *model_states.pt file") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)
    torch.save({"module": {}}, ckpt / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.INFO, logger="dude_dist"):
        assert ckpt_lib.verify_checkpoint(ckpt) == {"step": 1}
    assert caplog.messages == [f"checkpoint {ckpt} has no manifest.json (written by an older dude_dist): sizes and "
                               "checksums not checked"]


def test_a_changed_byte_and_a_missing_file_are_named(tmp_path):
    ckpt = save(tmp_path, 2)
    data = bytearray((ckpt / "zero" / "part.txt").read_bytes())
    data[0] ^= 1
    (ckpt / "zero" / "part.txt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {ckpt} is damaged: zero/part.txt does not match its sha256 in the manifest (its bytes "
            "changed after the save)") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)
    assert ckpt_lib.verify_checkpoint(ckpt, checksums=False)["step"] == 2
    (ckpt / "zero" / "part.txt").unlink()
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {ckpt} is damaged: zero/part.txt is missing (the manifest records 6 bytes)") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(tmp_path / 'nope'))} does not exist or is "
                                              "not a folder$"):
        ckpt_lib.verify_checkpoint(tmp_path / "nope")


def test_meta_needs_an_integer_step(tmp_path):
    for text in ('{"step": "3"}', "[1]", "{}"):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(CheckpointError, match="^" + re.escape(
                f"checkpoint {tmp_path} is damaged: meta.json has no integer 'step'") + "$"):
            ckpt_lib.read_meta(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(tmp_path))} is damaged: meta.json is "
                                              "missing$"):
        ckpt_lib.read_meta(tmp_path)


def test_the_restricted_unpickler_names_a_cut_file_and_a_foreign_one(tmp_path):
    good = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(1000)}, good)
    ckpt_lib._verify_pickle(tmp_path, good, [])
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-300])
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {tmp_path} is damaged: cut.pt cannot be read (Invalid argument; {cut.stat().st_size} bytes)")
            + "$"):
        ckpt_lib._verify_pickle(tmp_path, cut, [])
    legacy = tmp_path / "legacy.pt"  # not torch's zip format: read whole, still restricted
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"^refusing to load checkpoint .*: legacy.pt: it is not a weights-only "
                                              r"torch file \(.*\); the file is damaged or has been tampered with "
                                              r"\(nothing in it was run\)$"):
        ckpt_lib._verify_pickle(tmp_path, legacy, [])
    evil = tmp_path / "evil.pt"
    torch.save({"f": os.getcwd}, evil)
    with pytest.raises(ckpt_lib._ForbiddenGlobal, match=r"it names 'posix.getcwd'"):
        ckpt_lib._verify_pickle(tmp_path, evil, [])


def test_a_size_mismatch_of_a_tampered_pickle_names_the_global(tmp_path):
    ckpt = save(tmp_path, 2)
    torch.save({"f": os.getcwd}, ckpt / "mp_rank_00_model_states.pt")  # another size and a foreign global
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"refusing to load checkpoint {ckpt}: mp_rank_00_model_states.pt: it names 'posix.getcwd'")):
        ckpt_lib.verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"refusing to load checkpoint {ckpt}: mp_rank_00")):
        ckpt_lib.verify_checkpoint_files(ckpt)
    (ckpt / "zero" / "part.txt").write_text("other size")  # not a pickle: the size is what is wrong
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"zero/part.txt has 10 bytes, the manifest records 6"):
        ckpt_lib.verify_checkpoint(ckpt)


def test_the_manifest_itself_damaged_is_named(tmp_path):
    ckpt = save(tmp_path, 2)
    (ckpt / "manifest.json").write_text('{"files": ')
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {ckpt} is damaged: manifest.json:1: invalid JSON: Expecting value (column 11)") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)
    (ckpt / "manifest.json").write_text('{"version": 1}')
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"checkpoint {ckpt} is damaged: manifest.json cannot be read (KeyError: 'files')") + "$"):
        ckpt_lib.verify_checkpoint(ckpt)


def test_a_failure_on_another_rank_stops_this_one_too(tmp_path, monkeypatch):
    answers = iter([True])
    monkeypatch.setattr(ckpt_lib, "_any_rank", lambda flag: next(answers))
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"another rank could not write checkpoint {tmp_path / 'step_00000002.partial'}; nothing was committed "
            "(no earlier checkpoint exists)") + "$"):
        save(tmp_path, 2)
    assert not (tmp_path / "step_00000002.partial").exists()
    answers = iter([False, True])  # the files were written everywhere; rank 0's commit failed
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"rank 0 could not commit checkpoint {tmp_path / 'step_00000003.partial'} (no earlier checkpoint "
            "exists)") + "$"):
        ckpt_lib.save_checkpoint(RecordingEngine(), tmp_path, 3, {"world_size": 2}, rank=1, keep_last=5)


def test_portable_and_deepspeed_states_each_load_their_own_way(tmp_path):
    from tests.unit.test_checkpoint import TorchEngine

    engine = TorchEngine(seed=1)
    engine.save_checkpoint = RecordingEngine().save_checkpoint
    engine.load_checkpoint = RecordingEngine().load_checkpoint
    both = ckpt_lib.save_checkpoint(engine, tmp_path / "a", 1, {"world_size": 1}, rank=0, keep_last=2,
                                    trainable=engine.trainable(), deepspeed_files=True)
    calls = []
    engine.load_checkpoint = lambda *a, **k: calls.append("deepspeed") or (str(both), {})
    ckpt_lib.load_checkpoint(engine, both, rank=0)  # no trainable given: DeepSpeed's files
    assert calls == ["deepspeed"]
    legacy = ckpt_lib.save_checkpoint(engine, tmp_path / "b", 1, {"world_size": 1}, rank=0, keep_last=2)
    ckpt_lib.load_checkpoint(engine, legacy, rank=0, trainable=engine.trainable())  # no portable state there
    assert calls == ["deepspeed", "deepspeed"]


def test_a_run_without_a_schedule_saves_and_loads_and_state_json_is_indented(tmp_path):
    from tests.unit.test_checkpoint import TorchEngine

    plain = TorchEngine(seed=1)
    plain.lr_scheduler = None
    plain.train_step = None
    ckpt = ckpt_lib.save_checkpoint(plain, tmp_path, 1, {"world_size": 1}, rank=0, keep_last=2,
                                    trainable=plain.trainable())
    text = (ckpt / "state.json").read_text()
    assert json.loads(text)["scheduler"] is None and text == json.dumps(json.loads(text), indent=1)
    scheduled = TorchEngine(seed=1)
    before = scheduled.lr_scheduler.state_dict()
    ckpt_lib.load_checkpoint(scheduled, ckpt, rank=0, trainable=scheduled.trainable())
    assert scheduled.lr_scheduler.state_dict() == before  # nothing saved for it: left as it is
