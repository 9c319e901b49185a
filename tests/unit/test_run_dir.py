"""dude_dist/run_dir.py: the paths under output_dir, the run lock, archiving."""

from __future__ import annotations

import json
import logging
import os
import re
import socket

import pytest

from dude_dist import run_dir as run_dir_lib
from dude_dist.errors import RunDirBusyError, TrainingError
from dude_dist.run_dir import RUN_OUTPUTS, RunDir


@pytest.fixture(autouse=True)
def _propagate(monkeypatch):
    monkeypatch.setattr(logging.getLogger("dude_dist"), "propagate", True)  # setup_logging turns it off


def test_every_path_has_one_name_under_the_root(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    root = tmp_path / "run"
    assert rd.root == root
    assert (rd.checkpoints, rd.factor_cache, rd.tensorboard, rd.metrics, rd.summary, rd.dynamics_reference,
            rd.lock_path) == (root / "checkpoints", root / "dude_init", root / "tensorboard", root / "metrics.jsonl",
                              root / "summary.json", root / "dude_reference.safetensors", root / ".run.lock")
    assert rd.eval_file("cli") == root / "eval_cli.json"
    assert RunDir.of_checkpoint(root / "checkpoints" / "step_00000010").root == root


def test_check_writable_creates_the_folder_and_names_an_unwritable_one(tmp_path):
    rd = RunDir(tmp_path / "a" / "b")
    rd.check_writable()
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match=rf"^output_dir '{blocker}/run' is not writable: "):
        RunDir(blocker / "run").check_writable()


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path, caplog):
    (tmp_path / ".run.lock").write_text("x" * 500)  # a longer note left by an earlier holder
    first, second = RunDir(tmp_path), RunDir(tmp_path)
    old_umask = os.umask(0o022)
    try:
        first.acquire()
    finally:
        os.umask(old_umask)
    text = (tmp_path / ".run.lock").read_text()
    info = json.loads(text)
    assert text == json.dumps(info) + "\n"  # the earlier note is gone, not overwritten in part
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S*", info["started"]), info["started"]
    with pytest.raises(RunDirBusyError, match="^" + re.escape(
            f"output_dir {str(tmp_path)!r} is in use by another run (host {info['host']}, pid {info['pid']}, "
            f"started {info['started']}); wait for it to end, stop it, or give this run another output_dir "
            "(--set output_dir=...)") + "$"):
        second.acquire()
    assert second._lock_fd is None
    first.release()
    first.release()  # twice is harmless
    second.acquire()  # free again
    second.release()


def test_a_holder_that_has_not_written_yet_is_reported_as_unknown(tmp_path):
    import fcntl

    fd = os.open(tmp_path / ".run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunDirBusyError, match=r"is in use by another run \(holder unknown: it has not written its "
                                                  r"name yet\); wait"):
            RunDir(tmp_path).acquire()
    finally:
        os.close(fd)


def test_every_rank_gets_rank_0s_verdict(tmp_path):
    sent = []

    def broadcast(obj, src):
        sent.append((obj, src))
        return "output_dir '/x' is in use by another run (host h)"  # what rank 0 found

    with pytest.raises(TrainingError, match=r"^output_dir '/x' is in use by another run \(host h\)$"):
        RunDir(tmp_path).acquire_for_ranks(1, broadcast)  # rank 1 does not try the lock itself
    assert sent == [("", 0)] and not (tmp_path / ".run.lock").exists()
    rd = RunDir(tmp_path)
    rd.acquire_for_ranks(0, lambda obj, src: obj)
    assert rd._lock_fd is not None
    with pytest.raises(TrainingError, match="in use by another run"):
        RunDir(tmp_path).acquire_for_ranks(0, lambda obj, src: obj)
    rd.release()


def test_the_lock_file_is_readable_by_others(tmp_path):
    old_umask = os.umask(0o022)
    try:
        rd = RunDir(tmp_path)
        rd.acquire()
    finally:
        os.umask(old_umask)
    assert (tmp_path / ".run.lock").stat().st_mode & 0o777 == 0o644
    rd.release()


def test_archive_names_the_folder_by_time_and_says_what_moved(tmp_path, caplog):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.WARNING, logger="dude_dist"):
        dest = RunDir(tmp_path).archive_previous()
    assert re.fullmatch(r"\d{8}-\d{6}", dest.name) and dest.parent == tmp_path / "previous"
    assert caplog.messages == [f"output_dir held an earlier run; moved checkpoints, summary.json to {dest}"]


def test_archive_moves_every_output_but_the_factor_cache_and_never_overwrites(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    assert rd.archive_previous() is None
    assert not (tmp_path / "previous").exists()
    monkeypatch.setattr(run_dir_lib.time, "strftime", lambda fmt: "20261130-120000")
    for round_ in range(2):
        for name in RUN_OUTPUTS:
            (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text(f"{name} {round_}")
        (tmp_path / "dude_init").mkdir(exist_ok=True)
        dest = rd.archive_previous()
        assert dest == tmp_path / "previous" / ("20261130-120000" + ("-1" if round_ else ""))
        assert sorted(p.name for p in dest.iterdir()) == sorted(RUN_OUTPUTS)
        assert (tmp_path / "dude_init").is_dir()
        assert not any((tmp_path / name).exists() for name in RUN_OUTPUTS)
    assert (tmp_path / "previous" / "20261130-120000" / "summary.json").read_text() == "summary.json 0"
    assert (tmp_path / "previous" / "20261130-120000-1" / "summary.json").read_text() == "summary.json 1"
    (tmp_path / "metrics.jsonl").write_text("x")
    assert sorted(p.name for p in rd.archive_previous().iterdir()) == ["metrics.jsonl"]
