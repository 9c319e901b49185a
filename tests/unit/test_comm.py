"""dude_dist/comm.py: the one module that calls torch.distributed collectives, on the right device."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dude_dist import comm

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = {
    "all_reduce", "broadcast", "gather", "scatter", "reduce", "all_gather", "all_gather_object",
    "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "broadcast_object_list", "gather_object", "scatter_object_list", "send", "recv",
    "isend", "irecv",
}


def _collective_calls(path: Path) -> list[str]:
    """``dist.<collective>(...)`` / ``torch.distributed.<collective>(...)`` calls in one file."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                                  for a in node.names):
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_no_collective_outside_comm():
    files = sorted((ROOT / "dude_dist").glob("*.py")) + sorted((ROOT / "launch").glob("*.py"))
    calls = [c for f in files if f.name != "comm.py" for c in _collective_calls(f)]
    assert calls == [], "collectives outside dude_dist/comm.py:\n" + "\n".join(calls)


def test_the_ast_check_finds_a_collective(tmp_path):
    """Positive control: the checker sees every spelling the package could use."""
    bad = ROOT / "dude_dist" / "_probe_for_test.py"
    bad.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "dist.all_reduce(x)\ntorch.distributed.barrier()\nd2.broadcast(x, 0)\n")
    try:
        assert len(_collective_calls(bad)) == 3
    finally:
        bad.unlink()


def test_nccl_runs_on_the_local_gpu_and_gloo_on_the_host():
    assert comm.device_for_backend("nccl", local_rank=3, device_count=8) == torch.device("cuda", 3)
    # One GPU per task (CUDA_VISIBLE_DEVICES set per rank by the site): local rank 3 sees device 0.
    assert comm.device_for_backend("nccl", local_rank=3, device_count=1) == torch.device("cuda", 0)
    assert comm.device_for_backend("NCCL", local_rank=9, device_count=8) == torch.device("cuda", 1)
    assert comm.device_for_backend("gloo", local_rank=3, device_count=8) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        comm.device_for_backend("nccl", local_rank=0, device_count=0)


def test_comm_device_follows_the_process_group_backend(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert comm.comm_device() == torch.device("cuda", 5)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm.comm_device() == torch.device("cpu")


def test_a_host_tensor_is_reduced_on_the_comm_device_and_copied_back(monkeypatch):
    """What NCCL needs: the collective sees a tensor on the comm device, never the host one,
    and the caller's tensor receives the result. ``meta`` stands in for the GPU here."""
    seen = []

    def fake_all_reduce(t, op=None, group=None):
        seen.append(t.device)
        t.mul_(2)  # a meta tensor ignores arithmetic; record and mimic a sum over 2 ranks below

    monkeypatch.setattr(comm, "is_active", lambda: True)
    monkeypatch.setattr(comm, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    host = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert comm.all_reduce(host) is host and host.tolist() == [2.0, 4.0]
    assert seen == [torch.device("cpu")]

    moved = []
    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        moved.append(out.device)
        return out

    monkeypatch.setattr(comm, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: self)
    seen.clear()
    comm.all_reduce(torch.tensor([1.0]))
    assert seen == [torch.device("meta")] and moved[0] == torch.device("meta")


def test_single_process_is_a_no_op():
    assert not comm.is_active()
    t = torch.tensor([3.0])
    assert comm.all_reduce(t).tolist() == [3.0]
    assert comm.sum_floats([1.0, 2.0]) == [1.0, 2.0]
    assert comm.all_gather_floats([1.0]) == [[1.0]]
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object("x") == "x"
    assert comm.gather(t, 0) == [t]
