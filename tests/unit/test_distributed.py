"""dude_dist/distributed.py: the master address under mpirun, ranks per node, node-first order."""

from __future__ import annotations

import socket
from collections import namedtuple

import psutil

from dude_dist import comm
from dude_dist.distributed import DistEnv, on_each_node_first, routable_address

Addr = namedtuple("Addr", "family address")
Stat = namedtuple("Stat", "isup")


def _interfaces(monkeypatch, hostname_ip: str, nics: dict[str, tuple[str, bool]]):
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: hostname_ip)
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {n: [Addr(socket.AF_INET, ip)] for n, (ip, _) in nics.items()})
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {n: Stat(up) for n, (_, up) in nics.items()})


def test_master_address_is_not_the_debian_loopback_alias(monkeypatch):
    """gethostbyname(gethostname()) is 127.0.1.1 on Debian/Ubuntu: peers cannot reach it."""
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    _interfaces(monkeypatch, "127.0.1.1", {"lo": ("127.0.0.1", True), "docker0": ("172.17.0.1", False),
                                           "eth0": ("10.1.2.3", True)})
    assert routable_address() == ("10.1.2.3", "interface eth0")
    # NCCL_SOCKET_IFNAME names the interface to use.
    _interfaces(monkeypatch, "127.0.1.1", {"eth0": ("10.1.2.3", True), "ib0": ("192.168.5.9", True)})
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "=ib0")
    assert routable_address() == ("192.168.5.9", "interface ib0")
    # A host name that resolves to a real address is used as it is.
    _interfaces(monkeypatch, "10.9.9.9", {"eth0": ("10.1.2.3", True)})
    assert routable_address() == ("10.9.9.9", "host name node7")


def test_ranks_per_node_from_the_launcher(monkeypatch):
    env = DistEnv(rank=3, world_size=16, local_rank=3, master_addr="h", master_port=1, launcher="torchrun")
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert env.ranks_per_node == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert env.ranks_per_node == 4


def test_local_rank_zero_goes_first(monkeypatch):
    """Local rank 0 runs the block, then meets the others at the barrier; they run it after."""
    events: list[str] = []
    monkeypatch.setattr(comm, "barrier", lambda: events.append("barrier"))
    for local_rank in (0, 1):
        env = DistEnv(rank=local_rank, world_size=2, local_rank=local_rank, master_addr="h", master_port=1,
                      launcher="torchrun")
        with on_each_node_first(env):
            events.append(f"work{local_rank}")
    assert events == ["work0", "barrier", "barrier", "work1"]
