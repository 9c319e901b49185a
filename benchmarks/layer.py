"""One adapted linear layer, forward + backward: DuDe vs a minimal LoRA vs PEFT's DoRA.

    OMP_NUM_THREADS=2 python benchmarks/layer.py                            # fp32, 2 threads, idle CPU
    OMP_NUM_THREADS=1 python benchmarks/layer.py --threads 1 --clock cpu    # a shared CPU (~3 min)
    python benchmarks/layer.py --device cuda --dtype bfloat16 --repeats 50   # on a GPU

For each shape ``[out, in]`` (4096x4096, and a GQA ``v_proj`` 1024x4096; ``--shapes
"host-bound 64x64" --tokens 32 --rank 4`` times the per-layer overhead of dispatching the
ops and running autograd, which is what a small layer costs on a GPU) and ``--tokens``
tokens at rank ``--rank``, every implementation runs the same step: ``y = layer(x)`` with
``x`` requiring grad (an interior layer), then ``y.backward(g)``. Measured:

* time of forward + backward, median of ``--repeats`` after ``--warmup`` untimed runs,
  the implementations interleaved round by round so that load from other processes
  hits them alike;
* bytes saved for backward: every tensor that autograd packs
  (``torch.autograd.graph.saved_tensors_hooks``) and that is still referenced by the
  graph when backward starts, counted once per storage, leaving out storages that
  belong to a parameter (the frozen weight, ``A``, ``B``, ``m``). ``x`` itself is part
  of every implementation's count; the "beyond x" column leaves it out;
* on CUDA also the peak of ``torch.cuda.max_memory_allocated`` over the step, minus the
  memory allocated before it.

Implementations:

* ``lora``: frozen ``W`` plus ``(x A^T) B^T`` (written here, 6 lines);
* ``peft_lora`` / ``peft_dora``: ``peft`` ``LoraConfig(r, lora_alpha=r, use_dora=...)``
  injected into a module holding one ``nn.Linear``;
* ``dude_exact`` / ``dude_detach``: :class:`dude_dist.dude.DudeLinear` with
  ``norm_grad`` exact (the paper's gradient through the row norm) or detached, as built
  by default (the fused autograd function);
* ``dude_exact_eager`` / ``dude_detach_eager``: the same with ``fused=False``, the plain
  autograd ops the fused function replaces;
* ``dude_recompute``: ``dude_exact`` with ``recompute=True`` (``adapter.recompute``): the
  pre-scale output is rebuilt in backward instead of saved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import fmt, mib, time_once, wait_for_quiet, write_results  # noqa: E402
from dude_dist.dude import DudeLinear  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "v_proj 1024x4096": (1024, 4096),
          "host-bound 64x64": (64, 64)}  # per-layer overhead: run it with --tokens 32 --rank 4
DEFAULT_SHAPES = ("4096x4096", "v_proj 1024x4096")
IMPLS = ("lora", "peft_lora", "peft_dora", "dude_exact", "dude_detach", "dude_exact_eager", "dude_detach_eager",
         "dude_recompute")


class LoraLinear(nn.Module):
    """Plain LoRA: ``y = x W^T + (x A^T) B^T`` with ``W`` frozen (the reference cost)."""

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_a = nn.Parameter(lora_a)  # [r, in]
        self.lora_b = nn.Parameter(lora_b)  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b)


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear


def build_peft(weight: torch.Tensor, rank: int, use_dora: bool) -> nn.Module:
    """A PEFT ``lora.Linear`` (DoRA or not) around a frozen ``nn.Linear`` holding ``weight``."""
    from peft import LoraConfig, inject_adapter_in_model

    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    # init_lora_weights=False: B is random too, so no product is skipped for being zero.
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"], use_dora=use_dora,
                     init_lora_weights=False)
    holder = inject_adapter_in_model(cfg, _Holder(linear))
    layer = holder.proj
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    return layer.to(device=weight.device, dtype=weight.dtype)


def build(impl: str, out_f: int, in_f: int, rank: int, device: str, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device=device, dtype=dtype)
    lora_a = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(device=device, dtype=dtype)
    lora_b = (torch.randn(out_f, rank, generator=gen) / rank**0.5).to(device=device, dtype=dtype)
    if impl == "lora":
        return LoraLinear(weight, lora_a, lora_b)
    if impl in ("peft_lora", "peft_dora"):
        return build_peft(weight, rank, use_dora=impl == "peft_dora")
    mode = impl.split("_")[1]
    layer = DudeLinear(in_f, out_f, rank, norm_grad="exact" if mode == "recompute" else mode,
                       recompute=mode == "recompute", fused=not impl.endswith("_eager"), device=device, dtype=dtype)
    layer.init_dude(weight, lora_a, lora_b)
    return layer


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes that autograd keeps for backward after ``layer(x)``: (all, beyond ``x``'s storage).

    Storages of parameters are not counted; a storage saved twice counts once.
    """
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> _Saved:
        holder = _Saved(t)
        packed.append(weakref.ref(holder))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        y = layer(x)
    storages: dict[int, int] = {}
    for ref in packed:
        holder = ref()
        if holder is None:  # packed into a graph that forward already dropped (e.g. PEFT's eye product)
            continue
        s = holder.tensor.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
    total = sum(storages.values())
    beyond_x = total - storages.get(x.untyped_storage().data_ptr(), 0)
    del y
    return total, beyond_x


def peak_cuda_bytes(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer(x).backward(g)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def step_fn(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(g)

    return run


def bench_shape(label: str, out_f: int, in_f: int, args, dtype: torch.dtype) -> list[dict]:
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.tokens, in_f, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn(1, args.tokens, out_f, generator=gen).to(device=device, dtype=dtype)
    layers = {impl: build(impl, out_f, in_f, args.rank, device, dtype) for impl in args.impls}
    fns = {impl: step_fn(layer, x, g) for impl, layer in layers.items()}
    times: dict[str, list[float]] = {impl: [] for impl in layers}
    for fn in fns.values():  # warm-up, then rounds in which the order rotates
        for _ in range(args.warmup):
            fn()
    impls = list(fns)
    for i in range(args.repeats):
        for impl in impls[i % len(impls):] + impls[: i % len(impls)]:
            times[impl].append(time_once(fns[impl], sync, args.clock))
    rows = []
    for impl, layer in layers.items():
        total, beyond_x = saved_bytes(layer, x)
        ts = sorted(times[impl])
        rows.append({
            "shape": label, "out": out_f, "in": in_f, "impl": impl,
            "median_s": statistics.median(ts),
            "min_s": ts[0], "max_s": ts[-1], "times_s": times[impl],
            "saved_bytes": total, "saved_bytes_beyond_x": beyond_x,
            "cuda_peak_bytes": peak_cuda_bytes(layer, x, g) if device.startswith("cuda") else None,
        })
        print(f"{label:>18} {impl:>12}: {rows[-1]['median_s'] * 1e3:8.1f} ms  saved {mib(total):7.1f} MiB",
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 2)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: elapsed time; cpu: process CPU time (steadier on a shared machine, with --threads 1)")
    p.add_argument("--name", default="layer", help="results file stem (default: layer)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to leave the CPU idle")
    args = p.parse_args(argv)
    busy_at_start = wait_for_quiet(timeout=args.wait_quiet)
    if "lora" not in args.impls:
        p.error("--impls must include lora (the reference)")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    if args.device == "cpu":
        torch.set_num_threads(threads)
    elif args.clock == "cpu":
        p.error("--clock cpu measures nothing of a GPU's work; use --clock wall with --device cuda")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    records = []
    for label in args.shapes:
        records += bench_shape(label, *SHAPES[label], args, dtype)

    by = {(r["shape"], r["impl"]): r for r in records}
    columns = ["shape", "impl", f"fwd+bwd ms ({args.clock}, median)", "min–max ms", "× lora time", "× peft_dora time",
               "saved MiB", "saved beyond x MiB", "× lora saved"]
    if args.device.startswith("cuda"):
        columns.append("CUDA peak MiB")
    rows = []
    for r in records:
        ref, dora = by[(r["shape"], "lora")], by.get((r["shape"], "peft_dora"))
        row = [r["shape"], r["impl"], r["median_s"] * 1e3, f"{fmt(r['min_s'] * 1e3)}–{fmt(r['max_s'] * 1e3)}",
               r["median_s"] / ref["median_s"], r["median_s"] / dora["median_s"] if dora else None,
               mib(r["saved_bytes"]), mib(r["saved_bytes_beyond_x"]), r["saved_bytes"] / ref["saved_bytes"]]
        if args.device.startswith("cuda"):
            row.append(mib(r["cuda_peak_bytes"]))
        rows.append(row)
    notes = [
        "Goals for dude_*: ≤ 1.10× lora time, ≤ 0.7× peft_dora time, saved bytes ≤ 1.10× lora.",
        f"{args.tokens} tokens, rank {args.rank}, {args.dtype} on {args.device}"
        + (f", {threads} thread(s)" if args.device == "cpu" else "")
        + f"; {args.clock} clock" + (" (process CPU time)" if args.clock == "cpu" else "")
        + f"; median of {args.repeats} after {args.warmup} warm-up runs, implementations interleaved.",
        "Saved bytes: tensors autograd holds for backward once forward returns, one count per storage, "
        "parameters excluded; x is [tokens, in] and is saved by every implementation.",
    ]
    write_results(args.name, title=f"Layer forward+backward ({args.device}, {args.dtype})",
                  settings={**vars(args), "cpu_busy_at_start": busy_at_start, "threads": threads}, tables={"": (columns, rows)}, records=records,
                  notes=notes, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
