"""`launch/slurm/train.sbatch` on a real single-node SLURM cluster (2 CPUs, 2 tasks, gloo).

Covers what a cluster user does: submit and get the 1-process losses from 2 `srun` tasks; the
time-limit notice (USR1 to the batch script) checkpointing and requeueing the job, which resumes;
`scancel --signal=TERM` checkpointing and ending it; resubmitting, which resumes again without
factorising anything. The cluster comes from `slurm_cluster.py` (skipped without SLURM
installed, failed under CI=true).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dude_dist.tracking import read_scalars
from tests.helpers import PY, ROOT, proc_env, reference_run, step_metrics, summary, train_until
from tests.integration.slurm_cluster import SlurmCluster, require_slurm

pytestmark = pytest.mark.slow

SCRIPT = "launch/slurm/train.sbatch"
CONFIG = "configs/tiny_cpu.yaml"
STEPS = 3
OVERRIDES = (f"train.max_steps={STEPS}", "train.save_every=0")
TIMEOUT = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2) as running:
        yield running


def submit(cluster: SlurmCluster, output_dir: Path, *overrides: str) -> int:
    """The script as a user submits it, with this node's resources instead of its GPU defaults."""
    args = ["--job-name", "dude-test", "--partition", "debug", "--nodes", "1", "--ntasks-per-node", "2",
            "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "30:00",
            "--output", str(output_dir.parent / f"{output_dir.name}-slurm-%j.out"), SCRIPT, CONFIG]
    for item in overrides:
        args += ["--set", item]
    return cluster.sbatch(args, cwd=ROOT, env=proc_env(OUTPUT_DIR=str(output_dir), PYTHON=PY))


def last_step(output_dir: Path) -> int:
    try:
        return max(step_metrics(output_dir), default=0)
    except FileNotFoundError:
        return 0


def saved_step(output_dir: Path) -> int:
    return int((output_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def test_two_task_job_matches_one_process(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, *OVERRIDES)
    info = cluster.wait(job, {"COMPLETED"}, timeout=TIMEOUT)
    assert info["ExitCode"] == "0:0", cluster.describe(job)
    log = Path(info["StdOut"]).read_text()
    port = 29500 + job % 10000
    assert re.search(rf"rank 0/2 \(local 0\) via slurm, backend gloo, master \S+:{port}\b", log), log[-3000:]
    assert summary(out)["end_step"] == STEPS
    scalars = read_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    # metrics.jsonl holds the float64 losses (TensorBoard rounds them to float32).
    expected, got = step_metrics(reference_run(*OVERRIDES)), step_metrics(out)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-12), (step, got[step], expected[step])


def test_notice_requeues_term_stops_and_resubmit_resumes(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, "train.max_steps=2000", "train.save_every=0")
    cluster.wait(job, {"RUNNING"}, timeout=TIMEOUT, until=lambda: last_step(out) >= 2)

    # The time-limit notice (--signal=B:USR1@...) goes to the batch script only: it has the
    # tasks checkpoint and requeues the job, which resumes from that checkpoint.
    cluster.scancel(job, "--batch", "--signal=USR1")
    cluster.wait(job, {"RUNNING"}, timeout=TIMEOUT,
                 until=lambda: cluster.job(job)["Restarts"] == "1" and (out / "checkpoints" / "latest").is_file()
                 and last_step(out) >= saved_step(out) + 2)
    first_stop = saved_step(out)
    assert first_stop >= 2

    # scancel --signal=TERM reaches the tasks: checkpoint at the step boundary, exit 0, no requeue.
    cluster.scancel(job, "--signal=TERM")
    info = cluster.wait(job, {"COMPLETED"}, timeout=TIMEOUT)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", cluster.describe(job)
    log = Path(info["StdOut"]).read_text()
    assert "requeueing job" in log and f"job {job} (restart 1)" in log, log[-3000:]
    stopped = summary(out)
    assert stopped["stopped"] and stopped["start_step"] == first_stop, stopped
    assert stopped["init"]["svd_count"] == 0
    second_stop = saved_step(out)
    assert second_stop == stopped["end_step"] > first_stop
    # Across the requeue the 2 tasks took the steps of one uninterrupted process on the same schedule.
    expected = train_until(tmp_path / "reference", second_stop, "train.max_steps=2000", "train.save_every=0")
    got = step_metrics(out)
    assert sorted(got) == list(range(1, second_stop + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-12), (step, got[step], expected[step])

    # Resubmitted with the same output directory it resumes again and runs to its end.
    again = submit(cluster, out, f"train.max_steps={second_stop + 3}", "train.save_every=0")
    info = cluster.wait(again, {"COMPLETED"}, timeout=TIMEOUT)
    assert info["ExitCode"] == "0:0", cluster.describe(again)
    final = summary(out)
    assert final["start_step"] == second_stop and final["end_step"] == second_stop + 3 and not final["stopped"]
    assert final["init"]["svd_count"] == 0 and final["init"]["from_cache"]
    # Three processes' worth of logging, one curve: every step exactly once in TensorBoard.
    steps = [step for step, _ in read_scalars(out / "tensorboard")["train/loss"]]
    assert steps == list(range(1, second_stop + 4))
