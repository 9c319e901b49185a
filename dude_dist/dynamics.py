"""DuDe's training dynamics for TensorBoard: how far magnitude, direction and update moved.

For a DuDe layer with frozen ``W_f``, factors ``A [r, in]``, ``B [out, r]`` and magnitude
``m`` (``A0, B0, m0`` at step 0), rows ``V = W_f + B A`` and ``V0 = W_f + B0 A0`` (= ``W0``)::

    dude/magnitude_drift    ||m - m0|| / ||m0||            all layers' magnitudes together
    dude/direction_change   mean over rows of 1 - cos(V_i, V0_i)     all rows of all layers
    dude/update_norm        ||B A - B0 A0||_F / ||W0||_F     all layers together

Computed factored, never as an ``[out, in]`` matrix. With ``dA = A - A0`` and
``dB = B - B0`` the change of row ``i`` is ``d_i = dB_i A + B0_i dA = P_i Q`` with
``P = [dB, B0]`` (``[out, 2r]``) and ``Q = [A; dA]`` (``[2r, in]``), so::

    ||d_i||^2   = P_i (Q Q^T) P_i^T
    d_i . V0_i  = dB_i . (W_f A^T)_i + B0_i . (W_f dA^T)_i + (P_i Q A0^T) . B0_i
    ||V0_i||^2  = ||W_f,i||^2 + 2 B0_i . (W_f A0^T)_i + B0_i (A0 A0^T) B0_i^T
    ||V_i||^2   = ||V0_i||^2 + 2 d_i . V0_i + ||d_i||^2
    1 - cos     = sin^2 / (1 + cos),  sin^2 = (||d||^2 ||V0||^2 - (d . V0)^2) / (||V||^2 ||V0||^2)

The differences ``dA, dB`` are taken elementwise and ``sin^2`` is formed from them, so a
change of 1e-6 is not lost against rows of norm 1 (``1 - cos`` from two row norms would be).
The only products with ``W_f`` are ``W_f A^T`` and ``W_f dA^T`` (``[out, r]`` each, a block of
rows at a time in float32; float64 for a float64 weight); the rest is float64 on
``[out, 2r]`` and ``[2r, 2r]`` tensors.

Under ZeRO-3 the frozen weight is whole only inside the layer's forward, so the per-layer
sums are taken by a one-shot forward pre-hook on rank 0 during the first forward of a
logged step (the parameters the step's loss was computed with): no gather of its own, no
collective. Its cost is two ``[out, in] x [in, r]`` products per layer on the logged steps,
about what one forward's row norms cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dude_dist.dude import DudeLinear

logger = logging.getLogger(__name__)

REFERENCE_KEYS = ("lora_a", "lora_b", "magnitude")


@dataclass
class LayerDynamics:
    """Sums over the rows of one layer (float64): enough to pool layers exactly."""

    one_minus_cos: float  # sum over rows of 1 - cos(V_i, V0_i)
    rows: int
    update_sq: float  # ||B A - B0 A0||_F^2
    w0_sq: float  # ||W0||_F^2
    magnitude_sq: float  # ||m - m0||^2
    m0_sq: float  # ||m0||^2

    @classmethod
    def of(cls, values: list[float]) -> LayerDynamics:
        return cls(values[0], int(values[1]), *values[2:])

    def scalars(self) -> dict[str, float]:
        return {"magnitude_drift": math.sqrt(self.magnitude_sq / max(self.m0_sq, 1e-300)),
                "direction_change": self.one_minus_cos / max(self.rows, 1),
                "update_norm": math.sqrt(self.update_sq / max(self.w0_sq, 1e-300))}


def _weight_products(weight: torch.Tensor, factors: torch.Tensor, block_bytes: int = 16 << 20) -> torch.Tensor:
    """``weight @ factors.T`` (``[out, k]``, float64) in float32 (float64 for a float64 weight).
    A float32/float64 weight is used as it is, in one product; a lower-precision one is cast a
    block of rows at a time (at most ``block_bytes`` of float32, at least 256 rows): no
    ``[out, in]`` copy of the weight is made."""
    cdtype = torch.promote_types(weight.dtype, torch.float32)
    rhs = factors.to(device=weight.device, dtype=cdtype).T
    if weight.dtype == cdtype:
        return (weight @ rhs).double()
    out = torch.empty(weight.shape[0], factors.shape[0], dtype=torch.float64, device=weight.device)
    rows = max(256, block_bytes // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        out[start:start + rows] = (weight[start:start + rows].to(cdtype) @ rhs).double()
    return out


@torch.no_grad()
def layer_sums(layer: DudeLinear, a0: torch.Tensor, b0: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """The row sums of :class:`LayerDynamics` for ``layer`` against its step-0 factors, as a
    float64 tensor on the layer's device (no host sync). The layer's weight must be whole:
    under ZeRO-3, call it inside the layer's forward."""
    device = layer.weight.device
    a, b = layer.lora_a.double(), layer.lora_b.double()
    a0, b0 = a0.to(device=device, dtype=torch.float64), b0.to(device=device, dtype=torch.float64)
    da, db = a - a0, b - b0
    products = _weight_products(layer.weight, torch.cat([a, da]))  # [out, 2r]: W_f A^T, W_f dA^T
    wf_a, wf_da = products.split(layer.rank, dim=1)
    p, q = torch.cat([db, b0], dim=1), torch.cat([a, da])  # d = P Q
    d_sq = ((p @ (q @ q.T)) * p).sum(dim=1)
    d_v0 = (db * wf_a).sum(dim=1) + (b0 * wf_da).sum(dim=1) + ((p @ (q @ a0.T)) * b0).sum(dim=1)
    v0_sq = (layer.weight_sq_norm.double() + 2.0 * (b0 * (wf_a - wf_da)).sum(dim=1)
             + ((b0 @ (a0 @ a0.T)) * b0).sum(dim=1)).clamp_min(0.0)
    v_sq = (v0_sq + 2.0 * d_v0 + d_sq).clamp_min(0.0)
    both = (v_sq * v0_sq).clamp_min(1e-300)
    cos = (v0_sq + d_v0) / both.sqrt()
    sin_sq = ((d_sq * v0_sq - d_v0.square()).clamp_min(0.0) / both).clamp(max=1.0)
    one_minus_cos = torch.where(cos > 0, sin_sq / (1.0 + cos), 1.0 - cos)
    m, m0 = layer.magnitude.double(), m0.to(device=device, dtype=torch.float64)
    return torch.stack([one_minus_cos.sum(), d_sq.new_tensor(float(layer.out_features)), d_sq.sum(), v0_sq.sum(),
                        (m - m0).square().sum(), m0.square().sum()])


def layer_dynamics(layer: DudeLinear, a0: torch.Tensor, b0: torch.Tensor, m0: torch.Tensor) -> LayerDynamics:
    """:func:`layer_sums` read to the host."""
    return LayerDynamics.of(layer_sums(layer, a0, b0, m0).tolist())


def pool(parts: list[LayerDynamics]) -> LayerDynamics:
    """Several layers as one (sums of sums)."""
    return LayerDynamics(*(sum(getattr(p, f) for p in parts) for f in LayerDynamics.__dataclass_fields__))


class DudeDynamics:
    """Step-0 reference of every DuDe layer and the one-shot hooks that measure against it.

    Args:
        model: the model (possibly DeepSpeed-wrapped, ZeRO-3 partitioned).
        reference: ``<layer>.lora_a`` / ``.lora_b`` / ``.magnitude`` at step 0, or None for a
            fresh run: then the first armed forward (which must be step 1's) takes it from
            the layers, whose parameters ZeRO-3 has gathered there, and writes it to ``save_to``.
        save_to: where a fresh run keeps its reference for a resumed one.
    """

    def __init__(self, model: nn.Module, reference: dict[str, torch.Tensor] | None = None,
                 save_to: Path | None = None) -> None:
        self.layers = {name.removeprefix("module."): m for name, m in model.named_modules()
                       if isinstance(m, DudeLinear)}
        if reference is not None:
            missing = [f"{n}.{k}" for n in self.layers for k in REFERENCE_KEYS if f"{n}.{k}" not in reference]
            if missing:
                raise ValueError(f"the step-0 reference lacks {len(missing)} tensors, e.g. {missing[0]}")
        self.reference = dict(reference or {})
        self.save_to = save_to
        self.ready = reference is not None
        self._found: dict[str, torch.Tensor] = {}
        self._last: dict[str, LayerDynamics] = {}
        self._handles: list = []

    def save(self, path: Path) -> None:
        """Write the reference by an atomic rename."""
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.reference.items()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, model: nn.Module, path: Path) -> DudeDynamics | None:
        """The dynamics of a resumed run, or None (one log line) when its reference is missing,
        unreadable or from other layers."""
        try:
            return cls(model, load_file(str(path)))
        except (OSError, SafetensorError, ValueError) as exc:
            logger.warning("dude/* dynamics are off for this run: step-0 reference %s cannot be used (%s)", path, exc)
            return None

    @classmethod
    def for_run(cls, model: nn.Module, own: Path, resumed_from: Path | None) -> DudeDynamics | None:
        """A fresh run's (``resumed_from`` None) takes its reference in the first forward and
        keeps it at ``own``; a resumed run's reads the reference of the run its checkpoint
        belongs to and keeps a copy at ``own``. None when that reference cannot be used."""
        if resumed_from is None:
            return cls(model, save_to=own)
        dynamics = cls.load(model, resumed_from)
        if dynamics is not None and not own.is_file():
            dynamics.save(own)
        return dynamics

    def arm(self) -> None:
        """Measure every layer in its next forward (once)."""
        self.disarm()
        self._found = {}
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def measure(layer: DudeLinear, args) -> None:
            if not self.ready and f"{name}.lora_a" not in self.reference:
                self.reference.update({f"{name}.{key}": getattr(layer, key).detach().clone() for key in REFERENCE_KEYS})
            if name not in self._found:
                self._found[name] = layer_sums(layer, self.reference[f"{name}.lora_a"],
                                                   self.reference[f"{name}.lora_b"],
                                                   self.reference[f"{name}.magnitude"])
        return measure

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect(self) -> dict[str, float]:
        """``dude/*`` scalars of the armed forward ({} if no layer ran); disarms. One host read."""
        self.disarm()
        if not self._found:
            return {}
        if not self.ready:
            self.ready = True
            if self.save_to is not None:
                self.save(self.save_to)
        names = list(self._found)
        rows = torch.stack([self._found[n] for n in names]).tolist()
        self._last = {n: LayerDynamics.of(r) for n, r in zip(names, rows)}
        self._found = {}
        return {f"dude/{k}": v for k, v in pool(list(self._last.values())).scalars().items()}

    def histograms(self) -> dict[str, list[float]]:
        """Per layer type (the module's last name: ``q_proj``, ``v_proj``...), each layer's
        direction change and magnitude drift, from the last :meth:`collect`."""
        out: dict[str, list[float]] = {}
        for name, part in self._last.items():
            kind = name.rsplit(".", 1)[-1]
            values = part.scalars()
            out.setdefault(f"dude/direction_change/{kind}", []).append(values["direction_change"])
            out.setdefault(f"dude/magnitude_drift/{kind}", []).append(values["magnitude_drift"])
        return out
