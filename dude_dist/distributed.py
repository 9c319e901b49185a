"""Where this process sits in the job: one function reads every launcher's variables.

Supported, in order of precedence:

* ``deepspeed`` / ``torchrun`` (and anything else that sets ``RANK``/``WORLD_SIZE``),
* Open MPI ``mpirun`` (``OMPI_COMM_WORLD_*``; ``MASTER_ADDR`` from the environment or
  rank 0's address shared through mpi4py),
* SLURM ``srun`` (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``; the master is the first host
  of the step's node list),
* a plain ``python`` process (world size 1, a free loopback port).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process and how it was launched."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # single | env | torchrun | deepspeed | mpi | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03,07],gpu5``) without needing ``scontrol``."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    return hosts


def _slurm_master(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_slurm_nodelist(nodelist)[0]


def _mpi_master(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    addr = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(addr, root=0)


def discover_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank and master address from whatever launched us."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else ("deepspeed" if "CROSS_RANK" in env else "env")
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher=launcher,
        )
    if "OMPI_COMM_WORLD_SIZE" in env:
        return DistEnv(
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            master_addr=_mpi_master(env),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="mpi",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        # Inside an `srun` step. (The batch script itself has no STEP_NUM_TASKS and runs
        # as one process.) The port is derived from the job id so two jobs sharing a node
        # do not collide.
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or _slurm_master(env),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT + job % 10000)),
            launcher="slurm",
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                   master_port=int(env.get("MASTER_PORT", 0)) or _free_port(), launcher="single")


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Discover the environment, export it as ``RANK``/``WORLD_SIZE``/..., start the process group.

    Args:
        backend: ``auto`` (nccl with CUDA, else gloo), ``nccl`` or ``gloo``.
        timeout_s: collective timeout; a rank that disappears ends the others after this long.
    """
    import torch

    from dude_dist.tracking import setup_logging
    from dude_dist.zero import init_deepspeed_comm

    dist_env = discover_env()
    # The first moment the rank is known: without this the line below (INFO, rank 0) has no
    # handler yet and is dropped.
    setup_logging(dist_env.rank)
    os.environ.update({
        "RANK": str(dist_env.rank),
        "WORLD_SIZE": str(dist_env.world_size),
        "LOCAL_RANK": str(dist_env.local_rank),
        "MASTER_ADDR": dist_env.master_addr,
        "MASTER_PORT": str(dist_env.master_port),
    })
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dist_env.local_rank)
    init_deepspeed_comm(backend, timedelta(seconds=timeout_s), dist_env.rank, dist_env.world_size)
    logger.info("rank %d/%d (local %d) via %s, backend %s, master %s:%d", dist_env.rank, dist_env.world_size,
                dist_env.local_rank, dist_env.launcher, backend, dist_env.master_addr, dist_env.master_port)
    return dist_env
