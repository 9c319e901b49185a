"""Per-layer gradient norms of the DuDe layers, to name the culprit of a non-finite gradient.

DeepSpeed reports one global gradient norm and, when it is non-finite, skips the step and
zeroes the gradients. Which layer went wrong is gone by then, so tensor hooks on the
trainable parameters record each gradient's norm as backward produces it: the full, not yet
reduce-scattered, gradient of this rank's micro-batch, under ZeRO-3 too. A hook is one
``linalg.vector_norm`` (float64 accumulation) whose 0-dim result stays on the device;
nothing is summed, reduced or read on the host unless a step turns out non-finite, when
:meth:`LayerGradNorms.worst` sums the squares over parameters, micro-batches and ranks and names the layer:

* the first layer (module order) whose gradient is non-finite, with how many are, or
* else the layer with the largest gradient norm.

The record is a sum of per-rank, per-micro-batch squared norms, not the norm of the
reduced gradient; it locates a problem, it does not replace ``train/grad_norm``.

Fault injection for tests: ``DUDE_FAULT_INF_GRAD=<steps>@<layer>`` (e.g.
``5,6,7@model.layers.1.self_attn.v_proj``) multiplies that layer's magnitude gradient
by inf on the highest rank at those (1-based) steps, with a finite loss.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from dude_dist import comm
from dude_dist.dude import DudeLinear
from dude_dist.failures import Faults

FAULT_ENV = "DUDE_FAULT_INF_GRAD"


class LayerGradNorms:
    """Hooks on every DuDe layer's trainable parameters; :meth:`reset` before each step.

    Args:
        model: the (possibly DeepSpeed-wrapped, ZeRO-3 partitioned) model.
        rank, world: this process's rank and the world size (for the fault injection).
    """

    def __init__(self, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        self.names: list[str] = []
        self._handles = []
        # (layer index, a gradient's norm) per trainable parameter and micro-batch of the step
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._step = 0
        faults = Faults.from_env()
        self._fault_steps, self._fault_layer = faults.inf_grad_steps, faults.inf_grad_layer
        self._inject_here = rank == world - 1
        for name, module in model.named_modules():
            if not isinstance(module, DudeLinear):
                continue
            index = len(self.names)
            self.names.append(name.removeprefix("module."))
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    self._handles.append(param.register_hook(partial(self._record, index, pname)))

    def reset(self, step: int) -> None:
        """Start recording optimizer step ``step`` (0-based)."""
        self._step = step
        self._pending = []

    def _record(self, index: int, pname: str, grad: torch.Tensor) -> torch.Tensor | None:
        if (self._inject_here and self._step + 1 in self._fault_steps and pname == "magnitude"
                and self.names[index] == self._fault_layer):
            grad = grad * float("inf")
        self._pending.append((index, torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)))
        return grad

    def norms(self) -> list[float]:
        """Per-layer gradient norms of the current step, summed over ranks (collective)."""
        device = self._pending[0][1].device if self._pending else None
        sq = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        if self._pending:
            index = torch.tensor([i for i, _ in self._pending], device=device)
            sq.index_add_(0, index, torch.stack([n for _, n in self._pending]).square())
        comm.all_reduce(sq)
        return [math.sqrt(v) if math.isfinite(v) else v for v in sq.cpu().tolist()]

    def worst(self) -> str:
        """A phrase naming the layer to look at, e.g. ``"layer model.layers.1.self_attn.v_proj
        has a non-finite gradient (1 of 60 layers)"``. Collective."""
        norms = self.norms()
        if not norms:
            return "no DuDe layer gradients recorded"
        bad = [i for i, v in enumerate(norms) if not math.isfinite(v)]
        if bad:
            return (f"layer {self.names[bad[0]]} has a non-finite gradient "
                    f"({len(bad)} of {len(norms)} layers non-finite)")
        top = max(range(len(norms)), key=norms.__getitem__)
        return f"largest gradient norm {norms[top]:.4g} in layer {self.names[top]}"

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def grad_norm_of(params: list[nn.Parameter]) -> torch.Tensor:
    """2-norm of the gradients ``params`` hold (float64 accumulation, 0-dim, on their device):
    ``train/grad_norm`` where DeepSpeed keeps none (ZeRO off in fp32: the engine clips with
    ``clip_grad_norm_`` and drops the norm). Call it at the accumulation boundary, after the
    last backward has reduced the gradients over ranks and before ``engine.step()``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))
