"""The DuDe linear layer: DoRA's magnitude/direction split on a PiSSA-initialised residual.

Paper: "DuDe: Dual Decomposition of Weights" (arXiv 2505.14367), Eq. 8-9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

NORM_GRADS = ("exact", "detach")


class DudeLinear(nn.Module):
    """A frozen residual weight plus a trainable low-rank update, renormalised per row.

    With the frozen residual ``W_f [out, in]``, trainable ``A [r, in]``, ``B [out, r]`` and
    magnitude ``m [out]``::

        W' = m * (W_f + B A) / ||W_f + B A||_row
        y  = x W'^T + bias = (m / n) * (x W_f^T + (x A^T) B^T) + bias

    The row norm ``n`` is never built from an ``[out, in]`` matrix. Because ``W_f`` is
    frozen, its squared row norms are a constant buffer, and::

        n_i^2 = ||W_f[i]||^2 + 2 B[i] . (W_f A^T)[i] + B[i] (A A^T) B[i]^T

    needs only ``W_f A^T [out, r]`` (about as many flops as ``r`` extra tokens) and
    ``A A^T [r, r]``. Autograd then saves the input, ``x A^T`` and the pre-scale output,
    like PEFT's DoRA, but nothing of size ``out * in`` except the parameter itself.

    ``norm_grad="exact"`` differentiates through ``n`` as the paper does;
    ``norm_grad="detach"`` treats ``n`` as a constant in backward (DoRA §4.3), which
    drops the ``W_f A^T`` term from the backward graph.

    The magnitude's gradient needs the pre-scale output ``z = x W_f^T + (x A^T) B^T``
    (``[tokens, out]``). ``recompute=True`` keeps only ``x`` and ``x A^T`` (what LoRA
    keeps) and rebuilds ``z`` in backward (:class:`_ScaledLowRankLinear`): one more
    ``[tokens, in] x [in, out]`` matmul for ``tokens * out`` fewer saved numbers.

    ``fused=True`` (the default) runs the same arithmetic as one autograd function
    (:class:`_ScaledLinear`): the row norm and the scale ``m / n`` with a closed-form
    backward (no graph of a dozen small ops for the norm), ``z`` built in place, the bias
    added in the scaling pass and ``g * z`` formed a block of tokens at a time in backward:
    two to three fewer ``[tokens, out]`` allocations and elementwise passes per step, and
    about a quarter fewer ops dispatched, which is what a small layer costs on a GPU.
    ``fused=False`` is the plain autograd reference; under ``torch.autocast``, with mixed
    dtypes or with ``recompute`` (when training) the layer always takes it.

    Args:
        in_features: input size.
        out_features: output size.
        rank: rank ``r`` of the update.
        bias: whether the layer carries a (frozen) bias.
        norm_grad: ``exact`` or ``detach``.
        recompute: rebuild the pre-scale output in backward instead of saving it.
        fused: use the fused autograd function (ignored with ``recompute`` when training).
        eps: lower bound on ``n^2``; a zero row gives a zero output, never NaN.
        device: where to allocate.
        dtype: parameter dtype (the model's).

    Raises:
        ValueError: ``norm_grad`` not one of ``exact``/``detach``, or a non-positive rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = False,
        norm_grad: str = "exact",
        recompute: bool = False,
        fused: bool = True,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if norm_grad not in NORM_GRADS:
            raise ValueError(f"unknown norm_grad {norm_grad!r}; valid: {', '.join(NORM_GRADS)}")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.norm_grad = norm_grad
        self.recompute = recompute
        self.fused = fused
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, **kw))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))  # [out, r]
        self.magnitude = nn.Parameter(torch.ones(out_features, **kw))  # [out]
        # ||W_f[i]||^2. Derived from the frozen weight, so not part of the state dict.
        self.register_buffer(
            "weight_sq_norm",
            torch.zeros(out_features, device=device, dtype=torch.promote_types(dtype or torch.float32, torch.float32)),
            persistent=False,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, norm_grad={self.norm_grad}"
            + (", recompute=True" if self.recompute else "")
            + ("" if self.fused else ", fused=False")
        )

    def adapter_params(self) -> list[str]:
        """Names of the trainable DuDe parameters of this module."""
        return ["lora_a", "lora_b", "magnitude"]

    def _apply(self, fn, recurse=True):
        # The squared norms are a difference-free sum of large terms that n^2 is then
        # built on; casting them to bf16 (as `model.bfloat16()` would) costs 3 digits in
        # every row norm, so they stay in at least float32 whatever the module dtype.
        sq = self._buffers.pop("weight_sq_norm")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(sq)
            if moved.dtype not in (torch.float32, torch.float64):
                moved = sq.to(device=moved.device, dtype=torch.float32)
            self._buffers["weight_sq_norm"] = moved
        # Promoted to float64 (`module.double()`): a float32 sum cast up would cap every row
        # norm at float32 precision while the weight is now exact in float64, so rebuild it
        # from the weight when the whole weight is here (not a ZeRO-3 partition, not meta).
        weight = self.weight
        if (
            moved.dtype == torch.float64
            and sq.dtype != torch.float64
            and weight.dtype == torch.float64
            and weight.device.type != "meta"
            and tuple(weight.shape) == (self.out_features, self.in_features)
        ):
            with torch.no_grad():
                self._buffers["weight_sq_norm"] = row_sq_norm(weight).to(moved.device)
        return self

    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def row_norm(self) -> torch.Tensor:
        """``||W_f + B A||`` per output row, ``[out]``, in at least float32, without ``[out, in]``."""
        cdtype = self._compute_dtype()
        # Under torch.autocast the [r, r] and [out, r] products would run in bf16/fp16 and the
        # norm would lose the precision the float32 buffer keeps (m / n off by ~1e-3 at step 0).
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            lora_a = self.lora_a.to(cdtype)
            lora_b = self.lora_b.to(cdtype)
            wf_at = F.linear(self.weight, self.lora_a.to(self.weight.dtype)).to(cdtype)  # [out, r]
            a_at = lora_a @ lora_a.T  # [r, r]
            sq = (
                self.weight_sq_norm.to(cdtype)
                + 2.0 * (lora_b * wf_at).sum(dim=1)
                + ((lora_b @ a_at) * lora_b).sum(dim=1)
            )
            return sq.clamp_min(self.eps).sqrt()

    def scale(self) -> torch.Tensor:
        """``m / ||W_f + B A||_row`` (``[out]``, in at least float32) as plain autograd ops
        (the path of ``fused=False``; the fused function computes the same inside); with
        ``norm_grad="detach"`` no gradient passes through the norm."""
        norm = self.row_norm()
        if self.norm_grad == "detach":
            norm = norm.detach()
        return self.magnitude.to(norm.dtype) / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        if self.fused and not (self.recompute and grad) and self._can_fuse(x):
            if not grad:
                scale = _norm_scale(self.weight, self.weight_sq_norm, self.lora_a, self.lora_b, self.magnitude,
                                    self.eps)[0].to(x.dtype)
                return _scaled_linear(x, self.weight, self.lora_a, self.lora_b, scale, self.bias, keep_z=False)[0]
            return _ScaledLinear.apply(x, self.weight, self.weight_sq_norm, self.lora_a, self.lora_b, self.magnitude,
                                       self.bias, self.eps, self.norm_grad == "detach")
        scale = self.scale().to(x.dtype)  # [out]
        if self.recompute and grad:
            out = _ScaledLowRankLinear.apply(x, self.weight, self.lora_a, self.lora_b, scale)
        else:
            out = F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b)
            out = out * scale
        if self.bias is not None:
            out = out + self.bias
        return out

    def _can_fuse(self, x: torch.Tensor) -> bool:
        # Autocast picks each op's dtype itself, which the in-place products of the fused
        # function cannot follow; mixed dtypes are whatever the plain ops make of them.
        if torch.is_autocast_enabled(x.device.type):
            return False
        tensors = (self.weight, self.lora_a, self.lora_b) + ((self.bias,) if self.bias is not None else ())
        return all(t.dtype == x.dtype for t in tensors)

    @torch.no_grad()
    def init_dude(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Fill the layer from the original weight ``W0`` and its factors ``A0, B0``.

        ``W_f = W0 - B0 A0`` is computed in float32 and stored in the layer's dtype; the
        magnitude is then the row norm of the *stored* ``W_f + B A``, so that ``W' == W_f + B A``
        exactly at step 0.
        """
        residual = weight.float() - lora_b.float() @ lora_a.float()
        self.weight.copy_(residual)
        self.lora_a.copy_(lora_a)
        self.lora_b.copy_(lora_b)
        self.weight_sq_norm.copy_(row_sq_norm(self.weight))
        self.magnitude.copy_(self.row_norm())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W' = m * (W_f + B A) / n`` as an ``[out, in]`` tensor in the layer's dtype (for export)."""
        cdtype = self._compute_dtype()
        scale = (self.magnitude.to(cdtype) / self.row_norm())[:, None]
        full = self.weight.to(cdtype) + self.lora_b.to(cdtype) @ self.lora_a.to(cdtype)
        return (full * scale).to(self.weight.dtype)


def _scaled_linear(x, weight, lora_a, lora_b, scale, bias, *, keep_z: bool):
    """``(y, x A^T, z)`` with ``z = x W_f^T + (x A^T) B^T`` built in place and
    ``y = z * scale + bias``; without ``keep_z``, ``y`` is written over ``z``."""
    xa = F.linear(x, lora_a)  # [..., r]
    z = F.linear(x, weight).contiguous()  # [..., out], fresh
    z.view(-1, z.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), lora_b.T)
    if not keep_z:
        out = z.mul_(scale) if bias is None else torch.addcmul(bias, z, scale, out=z)
    else:
        out = z * scale if bias is None else torch.addcmul(bias, z, scale)
    return out, xa, z


class _ScaledLinear(torch.autograd.Function):
    """The whole fused DuDe layer as one autograd node::

        scale = m / n,   n = ||W_f + B A||_row   (:func:`_norm_scale`, at least float32)
        y     = (x W_f^T + (x A^T) B^T) * scale + bias

    Forward builds ``z = x W_f^T`` and adds ``(x A^T) B^T`` into it in place, then writes
    ``y = bias + z * scale`` in one pass; ``z`` is saved only when ``scale`` needs a
    gradient. Backward, with ``g`` the output gradient::

        gz      = g * scale,   d scale = sum over tokens of g * z   (one pass, see _scale_grads)
        d x     = gz W_f, then += (gz B) A     (in place)
        d A     = (gz B)^T x,   d B = gz^T (x A^T),   d bias = sum over tokens of g
        d m     = d scale / n,  and A, B get the norm's share (:func:`_norm_scale_grads`;
                  not with ``detach``, DoRA's §4.3 mode)

    One node where plain autograd makes a dozen for the norm: on a GPU each small op
    costs its launch. Only ``[tokens, *]``, ``[out, r]``/``[r, in]``/``[r, r]`` and ``[out]``
    tensors are formed; the only ``[out, in]`` tensor touched is the parameter ``W_f``,
    which gets no gradient. Saved tensors are never modified, so ``retain_graph`` and
    ``gradcheck`` work; double backward is not supported.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_sq_norm, lora_a, lora_b, magnitude, bias, eps: float, detach: bool):
        needs = ctx.needs_input_grad
        scale32, norm, wf_at, a_at, unclamped = _norm_scale(weight, weight_sq_norm, lora_a, lora_b, magnitude, eps)
        scale = scale32.to(x.dtype)
        through_norm = not detach and (needs[3] or needs[4])  # A or B get the norm's share
        keep_z = needs[5] or through_norm
        out, xa, z = _scaled_linear(x, weight, lora_a, lora_b, scale, bias, keep_z=keep_z)
        ctx.through_norm, ctx.keep_z, ctx.m_dtype = through_norm, keep_z, magnitude.dtype
        norm_parts = (scale32, wf_at, a_at, unclamped) if through_norm else (None,) * 4
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, xa, z if keep_z else None, norm, *norm_parts)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, scale, xa, z, norm, scale32, wf_at, a_at, unclamped = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
        grad_x = grad_a = grad_b = grad_m = grad_bias = grad_scale = None
        if needs[6]:
            grad_bias = g2.sum(0)
        if ctx.keep_z:
            gz, grad_scale = _scale_grads(g2, z.view(-1, z.shape[-1]), scale)
            grad_scale = grad_scale.to(norm.dtype)
        elif needs[0] or needs[3] or needs[4]:
            gz = g2 * scale
        if needs[0] or needs[3]:
            gzb = gz @ lora_b  # [tokens, r]
            if needs[0]:
                grad_x = torch.mm(gz, weight).addmm_(gzb, lora_a).view(x.shape)
            if needs[3]:
                grad_a = gzb.T @ x.reshape(-1, x.shape[-1])
        if needs[4]:
            grad_b = gz.T @ xa.reshape(-1, xa.shape[-1])
        if needs[5]:
            grad_m = (grad_scale / norm).to(ctx.m_dtype)
        if ctx.through_norm:
            norm_a, norm_b = _norm_scale_grads(grad_scale, weight, lora_a, lora_b, norm, scale32, wf_at, a_at,
                                               unclamped, (needs[3], needs[4]))
            if norm_a is not None:
                grad_a = grad_a + norm_a.to(grad_a.dtype)
            if norm_b is not None:
                grad_b = grad_b + norm_b.to(grad_b.dtype)
        return grad_x, None, None, grad_a, grad_b, grad_m, grad_bias, None, None


def _norm_scale(weight, weight_sq_norm, lora_a, lora_b, magnitude, eps: float):
    """``(scale, norm, W_f A^T, A A^T, unclamped)`` with ``scale = m / n`` and
    ``n^2 = max(eps, ||W_f[i]||^2 + B[i] . (2 W_f A^T + B A A^T)[i])`` per row, in at least
    float32 (the weight product in the weight's dtype, as :meth:`DudeLinear.row_norm`)."""
    cdtype = torch.promote_types(weight.dtype, torch.float32)
    a, b = lora_a.to(cdtype), lora_b.to(cdtype)
    wf_at = F.linear(weight, lora_a.to(weight.dtype)).to(cdtype)  # [out, r]
    a_at = a @ a.T  # [r, r]
    sq = torch.addmm(wf_at, b, a_at, beta=2.0).mul_(b).sum(dim=1).add_(weight_sq_norm.to(cdtype))
    norm = sq.clamp_min(eps).sqrt_()
    return magnitude.to(cdtype) / norm, norm, wf_at, a_at, sq > eps


def _norm_scale_grads(grad, weight, lora_a, lora_b, norm, scale, wf_at, a_at, unclamped, needs_ab: tuple[bool, bool]):
    """Gradients of ``A`` and ``B`` (in at least float32, None where not needed) through
    ``scale = m / n`` given ``grad`` of ``scale``; closed form, with ``s = n^2``::

        gs  = -grad * m / (2 n^3)   (0 where s was clamped to eps)
        d B = 2 gs * (W_f A^T + B A A^T)
        d A = 2 ((gs * B)^T W_f + ((gs * B)^T B) A)
    """
    gs2 = (grad * scale).div_(norm.square()).mul_(unclamped).neg_()  # 2 * d loss / d s, [out]
    b = lora_b.to(wf_at.dtype)
    grad_a = grad_b = None
    if needs_ab[1]:
        grad_b = torch.addmm(wf_at, b, a_at).mul_(gs2[:, None])
    if needs_ab[0]:
        gsb = gs2[:, None] * b  # [out, r]
        grad_a = (gsb.T.to(weight.dtype) @ weight).to(wf_at.dtype)
        grad_a.addmm_(gsb.T @ b, lora_a.to(wf_at.dtype))
    return grad_a, grad_b


def _scale_grads(g: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                 chunk_bytes: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g * scale, sum over tokens of g * z)`` for ``g, z`` of ``[tokens, out]``.

    On CPU both come from one sweep over blocks of tokens of about ``chunk_bytes``, so
    ``g`` is read from memory once and ``g * z`` never exists as a ``[tokens, out]``
    temporary (whose fresh pages cost more than the multiply). The sum accumulates in at
    least float32, as ``Tensor.sum`` does for bf16/fp16. Elsewhere: the two plain ops.
    """
    if z.device.type != "cpu":
        return g * scale, (g * z).sum(0)
    tokens, width = z.shape
    acc_dtype = torch.promote_types(z.dtype, torch.float32)
    gz = torch.empty((tokens, width), dtype=z.dtype, device=z.device)
    dots = torch.zeros(width, dtype=acc_dtype, device=z.device)
    rows = max(1, chunk_bytes // max(1, width * z.element_size()))
    buf = torch.empty((min(rows, tokens), width), dtype=z.dtype, device=z.device)
    part = torch.empty(width, dtype=acc_dtype, device=z.device)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        g_rows, block = g[start:stop], buf[: stop - start]
        torch.mul(g_rows, scale, out=gz[start:stop])
        torch.mul(g_rows, z[start:stop], out=block)
        torch.sum(block, 0, dtype=acc_dtype, out=part)
        dots += part
    return gz, dots.to(z.dtype)


class _ScaledLowRankLinear(torch.autograd.Function):
    """``y = (x W_f^T + (x A^T) B^T) * scale`` that saves ``x`` and ``x A^T`` only.

    Backward, with ``g`` the output gradient and ``gz = g * scale``::

        z       = x W_f^T + (x A^T) B^T          (rebuilt: the extra matmul)
        d scale = sum over tokens of g * z
        d x     = gz W_f + (gz B) A
        d A     = (gz B)^T x,   d B = gz^T (x A^T)

    ``W_f`` is frozen: no gradient is formed for it.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale):
        xa = F.linear(x, lora_a)  # [..., r]
        z = F.linear(x, weight) + F.linear(xa, lora_b)
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, xa)
        return z * scale

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, scale, xa = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
        gz = g2 * scale
        gzb = gz @ lora_b  # [tokens, r]
        grad_x = grad_a = grad_b = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = (gz @ weight + gzb @ lora_a).view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_a = gzb.T @ x2
        if ctx.needs_input_grad[3]:
            grad_b = gz.T @ xa2
        if ctx.needs_input_grad[4]:
            z = x2 @ weight.T + xa2 @ lora_b.T
            grad_scale = (g2 * z).sum(0)
        return grad_x, None, grad_a, grad_b, grad_scale


def row_sq_norm(weight: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Squared row norms of ``weight`` in float32 (float64 for float64), a chunk of rows at a time."""
    cdtype = torch.promote_types(weight.dtype, torch.float32)
    out = torch.empty(weight.shape[0], dtype=cdtype, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        block = weight[start : start + chunk_rows].to(cdtype)
        out[start : start + chunk_rows] = block.pow(2).sum(dim=1)
    return out
