"""One run per directory, Ctrl-C and a dead launcher stop cleanly, nothing logged twice
(dude_dist/run_dir.py, dude_dist/failures.py, dude_dist/tracking.py).

Each test starts real `launch/train.py` processes on the tiny config and acts on them
while they train: a second run on the same output_dir, SIGINT, SIGTERM to the `deepspeed`
command alone.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dude_dist.tracking import read_scalars
from tests.helpers import BIN, PY, ROOT, free_port, kill_group, proc_env, step_metrics, summary, train, train_args

pytestmark = pytest.mark.slow


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=proc_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        try:
            if max(step_metrics(out), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _logged_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def test_second_run_on_a_busy_output_dir_refuses_and_the_first_finishes(tmp_path):
    out = tmp_path / "run"
    first = _start([PY, *train_args(out, "train.max_steps=120", "train.save_every=40")], tmp_path / "first.log")
    try:
        _wait_for_step(out, 2, first)
        for resume in ("auto", "none"):  # none used to move the live run's files to previous/
            t0 = time.monotonic()
            second = train(out, "train.max_steps=5", "train.lr=1e-3", resume=resume, check=False)
            assert second.returncode == 2, second.stderr[-3000:]
            assert time.monotonic() - t0 < 60
            lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
            assert len(lines) == 1, second.stderr[-3000:]
            assert re.search(rf"is in use by another run \(host \S+, pid {first.pid}, started [^)]+\)", lines[0]), lines
            assert "Traceback" not in second.stderr
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_group(first)
    assert not (out / "previous").exists()
    assert _logged_steps(out) == list(range(1, 121))  # one run's steps, not interleaved
    assert summary(out)["end_step"] == 120
    # The lock went with the process: the next run takes the directory at once.
    again = train(out, "train.max_steps=121", "train.save_every=0", resume="auto")
    assert "resumed from" in again.stderr


def test_ctrl_c_checkpoints_and_a_resume_logs_no_step_twice(tmp_path):
    out = tmp_path / "run"
    proc = _start([PY, *train_args(out, "train.max_steps=60", "train.save_every=10")], tmp_path / "run.log")
    try:
        _wait_for_step(out, 14, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        kill_group(proc)
    log = (tmp_path / "run.log").read_text()
    assert "Ctrl-C (SIGINT) received: will checkpoint at the next step boundary" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    stopped = summary(out)
    assert stopped["stopped"] is True and stopped["end_step"] >= 14
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped['end_step']:08d}"  # nothing since the last save is lost
    # An interrupted run's rows after the checkpoint are dropped before the resumed run logs.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": stopped["end_step"] + 1, "train/loss": 99.0}) + "\n")
    train(out, "train.max_steps=60", "train.save_every=10", resume="auto")
    steps = _logged_steps(out)
    assert steps == list(range(1, 61)), steps
    assert 99.0 not in step_metrics(out).values()
    tb_steps = [s for s, _ in read_scalars(out / "tensorboard")["train/loss"]]
    assert sorted(tb_steps) == list(range(1, 61)), tb_steps


def test_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "run"
    # Steps of a few seconds (32 samples of up to 256 tokens), so both presses land in one step.
    proc = _start([PY, *train_args(out, "train.max_steps=400", "train.save_every=0", "train.micro_batch_size=8",
                                   "train.global_batch_size=32")], tmp_path / "run.log")
    try:
        _wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)  # two signals at the same instant reach Python as one
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        kill_group(proc)
    log = (tmp_path / "run.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "second Ctrl-C" in errors[0], log[-3000:]
    assert "Traceback" not in log


def test_sigterm_to_the_deepspeed_command_alone_stops_the_ranks(tmp_path):
    """`deepspeed` exits at once on SIGTERM, leaving `deepspeed.launcher.launch` and the ranks
    behind; the ranks see their launcher gone, checkpoint and exit."""
    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           *train_args(out, "train.max_steps=400", "train.save_every=0")]
    proc = _start(cmd, tmp_path / "run.log")
    try:
        _wait_for_step(out, 3, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if any(arg.startswith("--local_rank") for arg in p.cmdline())]
        assert len(ranks) == 2
        proc.send_signal(signal.SIGTERM)  # the deepspeed command only
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=90)
        assert not alive, f"ranks still running 90 s after the launcher died: {[p.pid for p in alive]}"
    finally:
        kill_group(proc)
    stopped = summary(out)
    assert stopped["stopped"] is True and stopped["end_step"] < 400
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped['end_step']:08d}"


def test_master_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = train(tmp_path / "run", "train.max_steps=1", check=False, timeout=120, MASTER_PORT=str(port))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"master port {port} on 127.0.0.1 is already in use" in errors[0], proc.stderr[-3000:]
    assert "MASTER_PORT=N" in errors[0] and "Traceback" not in proc.stderr
