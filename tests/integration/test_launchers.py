"""Every supported launcher trains the tiny config with 2 ranks and takes the same steps as 1 process.

Each test starts real launcher processes on this machine: `deepspeed` on one node, two
"nodes" on 127.0.0.1 (`deepspeed --no_ssh` and `torchrun --nnodes 2`, one launcher per node),
and Open MPI's `mpirun`. Rank discovery is `dude_dist/distributed.py`; its rank-0 log line
("rank 0/2 ... via <launcher>") names the launcher it recognised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dude_dist.checkpoint import META, find_resume
from tests.helpers import BIN, PY, free_port, reference_run, require, run_together, step_metrics, summary, train_args

pytestmark = pytest.mark.slow

STEPS = 3
OVERRIDES = (f"train.max_steps={STEPS}", "train.save_every=0")
TIMEOUT = 300


def assert_two_rank_run(output_dir: Path, log: str, launcher: str) -> None:
    """Finished, 2 ranks found through ``launcher``, and the 1-process run's losses to 1e-12."""
    result = summary(output_dir)
    assert result["end_step"] == STEPS and not result["stopped"], result
    assert re.search(rf"rank 0/2 \(local [01]\) via {launcher}\b", log), f"no 'rank 0/2 ... via {launcher}':\n{log[-3000:]}"
    ckpt = find_resume(output_dir / "checkpoints")
    assert ckpt is not None and json.loads((ckpt / META).read_text())["world_size"] == 2
    expected, got = step_metrics(reference_run(*OVERRIDES)), step_metrics(output_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-12), (step, got[step], expected[step])


def test_deepspeed_one_node(tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *train_args(out, *OVERRIDES)]
    (log,) = run_together([cmd], [tmp_path / "deepspeed.log"], timeout=TIMEOUT)
    assert_two_rank_run(out, log, "deepspeed")


def test_deepspeed_two_nodes_without_ssh(tmp_path):
    # Two host names for one machine: each launcher starts the ranks of its --node_rank.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out, port = tmp_path / "run", free_port()
    cmds = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", str(port), *train_args(out, *OVERRIDES)]
            for node in (0, 1)]
    logs = run_together(cmds, [tmp_path / "node0.log", tmp_path / "node1.log"], timeout=TIMEOUT)
    assert_two_rank_run(out, logs[0], "deepspeed")


def test_torchrun_two_nodes(tmp_path):
    out, port = tmp_path / "run", free_port()
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", str(port), *train_args(out, *OVERRIDES)]
            for node in (0, 1)]
    logs = run_together(cmds, [tmp_path / "node0.log", tmp_path / "node1.log"], timeout=TIMEOUT)
    assert_two_rank_run(out, logs[0], "torchrun")


def test_mpirun(tmp_path):
    mpirun = require("mpirun")
    out = tmp_path / "run"
    # --oversubscribe: Open MPI counts cores as slots and refuses 2 ranks on a 1-core runner;
    # --bind-to none: leave placement to the OS (by default each rank is pinned to one core).
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2",
           "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}", "-x", "PATH", "-x", "OMP_NUM_THREADS",
           PY, *train_args(out, *OVERRIDES)]
    (log,) = run_together([cmd], [tmp_path / "mpirun.log"], timeout=TIMEOUT)
    assert_two_rank_run(out, log, "mpi")
