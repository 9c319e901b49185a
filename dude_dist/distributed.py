"""Where this process sits in the job: one function reads every launcher's variables.

Supported, in order of precedence:

* ``deepspeed`` / ``torchrun`` (and anything else that sets ``RANK``/``WORLD_SIZE``),
* Open MPI ``mpirun`` (``OMPI_COMM_WORLD_*``; ``MASTER_ADDR`` from the environment or
  rank 0's address shared through mpi4py),
* SLURM ``srun`` (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``; the master is the first host
  of the step's node list),
* a plain ``python`` process (world size 1, a free loopback port).

On GPUs each rank uses ``cuda:<local_rank % device_count>`` (a site that binds one GPU per
task shows each rank one device), NCCL reports a failed collective as an error instead of
hanging (``TORCH_NCCL_ASYNC_ERROR_HANDLING``), and the collective timeout is long
(``deepspeed.timeout_s``) only while the model loads and initialises; :func:`set_step_timeout`
then shortens it (``deepspeed.step_timeout_s``) so a lost peer ends the job in minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from dude_dist import comm
from dude_dist.comm import device_for_backend
from dude_dist.errors import LaunchError
from dude_dist.logs import setup_logging
from dude_dist.zero import init_deepspeed_comm

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
    backend: str = "gloo"
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ranks_per_node(self) -> int:
        """Ranks on this node: the launcher's ``LOCAL_WORLD_SIZE``/``LOCAL_SIZE``, else the GPUs
        here (capped by the world size), else the world size."""
        for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
            value = os.environ.get(key, "")
            if value.isdigit() and int(value) > 0:
                return min(int(value), self.world_size)

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return min(count, self.world_size) if count else self.world_size

    @property
    def device(self):
        """Where this rank's model runs: its GPU (``local_rank % device_count``) or the CPU."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device("cuda", self.local_rank % count) if count else torch.device("cpu")


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def free_port() -> int:
    """A free TCP port on the loopback interface (a one-process run; tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child run started from Python (tests, benchmarks): one OpenMP
    thread per process, the hub and datasets offline, unbuffered output, transformers' own
    warnings off, and no inherited ``MASTER_PORT`` (each launch picks its own); ``extra`` last."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"})
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


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


def routable_address() -> tuple[str, str]:
    """This host's address for peers to reach, and where it came from.

    ``gethostbyname(gethostname())`` is 127.0.1.1 on many Debian/Ubuntu hosts, which other
    nodes cannot reach; so the host name is used only if it resolves to a non-loopback
    address, else the first non-loopback IPv4 address of an interface that is up
    (``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME``, if set, names the interface).
    """
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr, f"host name {socket.gethostname()}"
    except OSError:
        pass

    wanted = os.environ.get("NCCL_SOCKET_IFNAME") or os.environ.get("GLOO_SOCKET_IFNAME") or ""
    wanted_names = [w for w in wanted.lstrip("=^").split(",") if w]
    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        if not stats.get(name) or not stats[name].isup:
            continue
        if wanted_names and not any(name.startswith(w) for w in wanted_names):
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address, f"interface {name}"
    return "127.0.0.1", "loopback (no other interface is up)"


def _mpi_master(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    found = routable_address() if comm.Get_rank() == 0 else None
    if found is not None:
        logger.info("mpirun: master address %s (from the %s; set MASTER_ADDR to choose)", *found)
    return comm.bcast(found[0] if found else None, root=0)


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
                   master_port=int(env.get("MASTER_PORT", 0)) or free_port(), launcher="single")


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Discover the environment, export it as ``RANK``/``WORLD_SIZE``/..., start the process group.

    Logging is set up here, once, as soon as the rank is known.

    Args:
        backend: ``auto`` (nccl with CUDA, else gloo), ``nccl`` or ``gloo``.
        timeout_s: collective timeout while the model loads and initialises.

    Raises:
        LaunchError: the master port is taken, or NCCL without a GPU (the message says what to change).
    """
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
        # A failed or timed-out NCCL collective raises in the rank instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        try:
            device = device_for_backend(backend, dist_env.local_rank, torch.cuda.device_count())
        except RuntimeError as exc:
            raise LaunchError(f"deepspeed.backend=nccl: {exc}; use deepspeed.backend=gloo on CPU") from None
        torch.cuda.set_device(device)
    try:
        init_deepspeed_comm(backend, timedelta(seconds=timeout_s), dist_env.rank, dist_env.world_size)
    except RuntimeError as exc:
        if "address already in use" in str(exc).lower() or "eaddrinuse" in str(exc).lower():
            raise LaunchError(
                f"master port {dist_env.master_port} on {dist_env.master_addr} is already in use (another job?); "
                "pick a free one: deepspeed --master_port N, torchrun --master_port N, or MASTER_PORT=N") from None
        raise
    dist_env = DistEnv(**{**dist_env.__dict__, "backend": backend})
    logger.info("rank %d/%d (local %d) via %s, backend %s, master %s:%d", dist_env.rank, dist_env.world_size,
                dist_env.local_rank, dist_env.launcher, backend, dist_env.master_addr, dist_env.master_port)
    return dist_env


def set_step_timeout(timeout_s: int) -> None:
    """Shorten the collective timeout once start-up is over (loading a 70B model needs the long one)."""
    if dist.is_initialized() and hasattr(distributed_c10d, "_set_pg_timeout"):
        distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))


@contextlib.contextmanager
def on_each_node_first(env: DistEnv) -> Iterator[None]:
    """Run the block on local rank 0 of every node first, then on the other ranks.

    A model download or a datasets cache is then written once per node (once in all, on a
    shared filesystem) while the other ranks wait at a barrier (``deepspeed.timeout_s``),
    instead of every rank fetching and writing the same files at once.
    """
    if env.local_rank != 0:
        comm.barrier()
    try:
        yield
    finally:
        if env.local_rank == 0:
            comm.barrier()
