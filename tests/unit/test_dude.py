"""DudeLinear (dude_dist/dude.py): gradients, saved-for-backward memory, zero rows, dtypes.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_dude.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dude_dist.dude import DudeLinear, _scale_grads, _ScaledLinear, row_sq_norm
from dude_dist.svd_init import factorize

OUT, IN, RANK = 48, 32, 4  # non-square, so an [out, in] tensor is recognisable by its size


def make_layer(*, norm_grad: str = "exact", bias: bool = True, seed: int = 0, dtype=torch.float32) -> DudeLinear:
    """A DuDe layer initialised from a random W0, then moved off its init point so that every
    term of the gradient (the W_f A^T cross term, a non-unit m/n) is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, generator=gen) / IN**0.5
    fac = factorize(w0, RANK, variant="dude")
    layer = DudeLinear(IN, OUT, RANK, bias=bias, norm_grad=norm_grad)
    layer.init_dude(w0, fac.lora_a, fac.lora_b)
    with torch.no_grad():
        if bias:
            layer.bias.copy_(torch.randn(OUT, generator=gen))
        layer.lora_a.add_(0.3 * torch.randn(RANK, IN, generator=gen))
        layer.lora_b.add_(0.3 * torch.randn(OUT, RANK, generator=gen))
        layer.magnitude.mul_(1 + 0.2 * torch.randn(OUT, generator=gen))
    return layer.to(dtype)


def reference_forward(layer: DudeLinear, x: torch.Tensor, lora_a, lora_b, magnitude, *, detach_norm: bool):
    """``y = x W'^T + bias`` with ``W' = m (W_f + B A) / ||W_f + B A||_row`` built as a full matrix."""
    full = layer.weight + lora_b @ lora_a  # [out, in], materialised on purpose
    norm = full.norm(dim=1)
    if detach_norm:
        norm = norm.detach()
    merged = magnitude[:, None] * full / norm[:, None]
    return torch.nn.functional.linear(x, merged, layer.bias)


def grads_of(layer: DudeLinear, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    (layer(x) * g).sum().backward()
    return {n: getattr(layer, n).grad.clone() for n in layer.adapter_params()}


def reference_grads(layer: DudeLinear, x: torch.Tensor, g: torch.Tensor, *, detach_norm: bool) -> dict[str, torch.Tensor]:
    params = {n: getattr(layer, n).detach().clone().requires_grad_(True) for n in layer.adapter_params()}
    y = reference_forward(layer, x, params["lora_a"], params["lora_b"], params["magnitude"], detach_norm=detach_norm)
    (y * g).sum().backward()
    return {n: p.grad for n, p in params.items()}


def max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


# --------------------------------------------------------------------------- gradients


def test_exact_gradients_match_float64_reference_through_the_norm(test_device):
    layer = make_layer(norm_grad="exact").double().to(test_device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, IN, generator=gen, dtype=torch.float64).to(test_device)
    g = torch.randn(2, 5, OUT, generator=gen, dtype=torch.float64).to(test_device)

    got = grads_of(layer, x, g)
    want = reference_grads(layer, x, g, detach_norm=False)
    diffs = max_diff(got, want)
    assert all(d <= 1e-8 for d in diffs.values()), f"exact-mode gradient max |diff| vs float64 reference: {diffs}"
    # The comparison means something only if the gradients are not tiny themselves.
    assert all(want[k].abs().max() > 1e-2 for k in want)

    with torch.no_grad():
        y_ref = reference_forward(layer, x, layer.lora_a, layer.lora_b, layer.magnitude, detach_norm=False)
        assert (layer(x) - y_ref).abs().max().item() <= 1e-12


def test_detach_gradients_match_detached_reference_and_differ_from_exact(test_device):
    layer = make_layer(norm_grad="detach").double().to(test_device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, IN, generator=gen, dtype=torch.float64).to(test_device)
    g = torch.randn(7, OUT, generator=gen, dtype=torch.float64).to(test_device)

    got = grads_of(layer, x, g)
    detached = reference_grads(layer, x, g, detach_norm=True)
    exact = reference_grads(layer, x, g, detach_norm=False)
    diffs = max_diff(got, detached)
    assert all(d <= 1e-8 for d in diffs.values()), f"detach-mode gradient max |diff| vs detached reference: {diffs}"
    # Dropping d n / d(A, B) changes the A and B gradients by far more than rounding.
    gap = max_diff(got, exact)
    assert gap["lora_a"] > 1e-3 and gap["lora_b"] > 1e-3, f"detach vs exact gradient gap too small: {gap}"
    # The magnitude enters only through m / n, so its gradient is the same in both modes.
    assert gap["magnitude"] <= 1e-8


def test_unknown_norm_grad_and_bad_rank_are_rejected():
    with pytest.raises(ValueError, match=r"^unknown norm_grad 'approx'; valid: exact, detach$"):
        DudeLinear(4, 4, 2, norm_grad="approx")
    with pytest.raises(ValueError, match="rank"):
        DudeLinear(4, 4, 0)


# --------------------------------------------------------------------------- the fused function


def fused_and_eager(norm_grad: str, *, bias: bool) -> tuple[DudeLinear, DudeLinear]:
    """Two float64 layers with the same parameters; a bias, if any, is made trainable so
    that its gradient is checked too."""
    fused = make_layer(norm_grad=norm_grad, bias=bias).double()
    eager = make_layer(norm_grad=norm_grad, bias=bias).double()
    eager.fused = False
    for layer in (fused, eager):
        if bias:
            layer.bias.requires_grad_(True)
    return fused, eager


def step_grads(layer: DudeLinear, x0: torch.Tensor, loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x0.detach().requires_grad_(True)
    y = layer(x)
    loss(y).backward()
    names = [*layer.adapter_params(), *(["bias"] if layer.bias is not None and layer.bias.requires_grad else [])]
    return y, {"x": x.grad, **{n: getattr(layer, n).grad for n in names}}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


X_SHAPES = {
    "2d": lambda gen: torch.randn(7, IN, generator=gen, dtype=torch.float64),
    "3d": lambda gen: torch.randn(2, 5, IN, generator=gen, dtype=torch.float64),
    "3d_strided": lambda gen: torch.randn(5, 2, IN, generator=gen, dtype=torch.float64).transpose(0, 1),
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_shape", list(X_SHAPES))
@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
def test_fused_matches_eager_in_float64(norm_grad, x_shape, bias, test_device):
    """The fused function gives the plain autograd path's output and gradients of x, A, B,
    m (and a trainable bias) to rounding, for 2-D, 3-D and non-contiguous 3-D inputs."""
    fused, eager = (layer.to(test_device) for layer in fused_and_eager(norm_grad, bias=bias))
    gen = torch.Generator().manual_seed(11)
    x0 = X_SHAPES[x_shape](gen).to(test_device)
    g = torch.randn(*x0.shape[:-1], OUT, generator=gen, dtype=torch.float64).to(test_device)
    y_f, got = step_grads(fused, x0, lambda y: (y * g).sum())
    y_e, want = step_grads(eager, x0, lambda y: (y * g).sum())
    assert type(y_f.grad_fn).__name__ == "_ScaledLinearBackward"  # really the fused path
    assert type(y_e.grad_fn).__name__ != "_ScaledLinearBackward"
    assert y_f.shape == y_e.shape == (*x0.shape[:-1], OUT)
    assert rel_err(y_f, y_e) <= 1e-12
    assert got.keys() == want.keys() == {"x", "lora_a", "lora_b", "magnitude", *(["bias"] if bias else [])}
    errs = {k: rel_err(got[k], want[k]) for k in want}
    assert all(e <= 1e-12 for e in errs.values()), errs
    assert all(want[k].abs().max() > 1e-2 for k in want)  # not trivially small
    # A loss whose output gradient is an expanded (stride-0) tensor takes the same path.
    _, got_sum = step_grads(fused, x0, lambda y: y.sum())
    _, want_sum = step_grads(eager, x0, lambda y: y.sum())
    errs = {k: rel_err(got_sum[k], want_sum[k]) for k in want_sum}
    assert all(e <= 1e-12 for e in errs.values()), errs


def _fused_inputs(x_dims: int, bias: bool, detach: bool, gen: torch.Generator) -> tuple:
    out_f, in_f, rank = 5, 4, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    x = rnd(*([2, 3] if x_dims == 3 else [3]), in_f)
    weight = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    return (x, weight, row_sq_norm(weight), rnd(rank, in_f), rnd(out_f, rank), rnd(out_f),
            rnd(out_f) if bias else None, 1e-12, detach)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dims", [2, 3])
def test_fused_function_passes_gradcheck(x_dims, bias):
    """The fused function's backward, the norm's share included, against finite differences
    in x, A, B, m and the bias; the frozen weight and its squared-norm buffer are constants."""
    inputs = _fused_inputs(x_dims, bias, False, torch.Generator().manual_seed(12))
    assert torch.autograd.gradcheck(_ScaledLinear.apply, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_function_with_detach_holds_the_norm_constant(bias):
    """``detach``: A and B get only the output path's gradient, m the full one: plain
    autograd with the norm built from detached factors is the reference."""
    gen = torch.Generator().manual_seed(16)
    x, w, sq, a, b, m, bias_t, eps, _ = _fused_inputs(3, bias, True, gen)
    y = _ScaledLinear.apply(x, w, sq, a, b, m, bias_t, eps, True)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((y * g).sum(), [t for t in (x, a, b, m, bias_t) if t is not None])
    ad, bd = a.detach(), b.detach()
    norm = (sq + 2 * (bd * (w @ ad.T)).sum(1) + ((bd @ (ad @ ad.T)) * bd).sum(1)).clamp_min(eps).sqrt()
    want_y = (x @ w.T + (x @ a.T) @ b.T) * (m / norm) + (bias_t if bias_t is not None else 0)
    want = torch.autograd.grad((want_y * g).sum(), [t for t in (x, a, b, m, bias_t) if t is not None])
    assert torch.allclose(y, want_y, rtol=1e-12, atol=0)
    for got_t, want_t in zip(got, want, strict=True):
        assert torch.allclose(got_t, want_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_passes_gradcheck_through_the_norm(bias):
    """The whole exact-mode layer (norm graph + fused function) against finite differences
    in x, A, B, m and the bias."""
    layer = make_layer(norm_grad="exact", bias=bias).double()
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, IN, generator=gen, dtype=torch.float64).requires_grad_(True)
    names = [*layer.adapter_params(), *(["bias"] if bias else [])]
    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]

    def fn(x, *ps):
        y = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))
        assert type(y.grad_fn).__name__ == "_ScaledLinearBackward"
        return y

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
def test_fused_matches_eager_on_a_row_whose_norm_is_clamped(norm_grad):
    """A row of ``W_f + B A`` of norm 1e-7 (``W_f`` nearly cancels a non-zero ``B A``) has its
    squared norm clamped to ``eps`` (1e-12): no gradient through the norm there, and the same
    gradients as the plain ops."""
    fused, eager = fused_and_eager(norm_grad, bias=False)
    for layer in (fused, eager):
        with torch.no_grad():
            layer.weight[3] = -(layer.lora_b[3] @ layer.lora_a)
            layer.weight[3, 0] += 1e-7
            layer.weight_sq_norm.copy_(row_sq_norm(layer.weight))
    assert fused.lora_b[3].abs().max() > 0.1
    gen = torch.Generator().manual_seed(17)
    x0 = torch.randn(6, IN, generator=gen, dtype=torch.float64)
    g = torch.randn(6, OUT, generator=gen, dtype=torch.float64)
    y_f, got = step_grads(fused, x0, lambda y: (y * g).sum())
    y_e, want = step_grads(eager, x0, lambda y: (y * g).sum())
    assert torch.all(torch.isfinite(y_f))
    errs = {k: rel_err(got[k], want[k]) for k in want}
    # m / n is ~1e6 on that row, so x's and m's gradients carry z's rounding times 1e6
    assert errs["lora_a"] <= 1e-12 and errs["lora_b"] <= 1e-12 and max(errs.values()) <= 1e-9, errs
    assert all(torch.all(torch.isfinite(t)) for t in got.values())


def test_fused_layer_dispatches_fewer_ops_than_the_plain_autograd_path():
    """On a GPU a small layer's step costs its kernel launches: the fused layer (one autograd
    node with the norm inside) must dispatch fewer ops than the plain path, forward and
    backward (measured: 26 + 50 against 31 + 72 on CPU, whose blockwise g*z sweep adds ops
    a GPU does not run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for fused in (True, False):
        layer = make_layer(bias=False)
        layer.fused = fused
        x = torch.randn(2, 8, IN).requires_grad_(True)
        Count.n = 0
        with Count():
            y = layer(x)
        fwd = Count.n
        Count.n = 0
        with Count():
            y.backward(torch.ones_like(y))
        counts[fused] = (fwd, Count.n)
    (f_fwd, f_bwd), (e_fwd, e_bwd) = counts[True], counts[False]
    assert f_fwd < e_fwd and f_bwd <= e_bwd - 15, counts


def test_fused_backward_can_run_twice_and_no_grad_forward_matches(test_device):
    """The saved tensors are not modified in backward: a retained graph gives the same
    gradients again; a forward without grad (the in-place path) gives the same output."""
    layer = make_layer().double().to(test_device)
    x = torch.randn(3, IN, dtype=torch.float64).to(test_device).requires_grad_(True)
    y = layer(x)
    y.square().sum().backward(retain_graph=True)
    first = (x.grad.clone(), layer.lora_a.grad.clone(), layer.magnitude.grad.clone())
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y.square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(first, (x.grad, layer.lora_a.grad, layer.magnitude.grad), strict=True))
    with torch.no_grad():
        assert torch.equal(layer(x), y.detach())


def test_fused_falls_back_to_autograd_under_autocast():
    """Autocast decides each op's dtype; the layer then runs the plain ops, bit for bit."""
    fused, eager = make_layer(), make_layer()
    eager.fused = False
    x = torch.randn(4, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, y_e = fused(x), eager(x)
    assert type(y_f.grad_fn).__name__ != "_ScaledLinearBackward"
    assert y_f.dtype == y_e.dtype and torch.equal(y_f, y_e)


def test_fused_bfloat16_layer_matches_eager():
    """bf16: same output and gradients as the plain ops to bf16 rounding."""
    fused, eager = make_layer().bfloat16(), make_layer().bfloat16()
    eager.fused = False
    x0 = torch.randn(3, 8, IN, generator=torch.Generator().manual_seed(14)).bfloat16()
    y_f, got = step_grads(fused, x0, lambda y: y.float().square().sum())
    y_e, want = step_grads(eager, x0, lambda y: y.float().square().sum())
    assert type(y_f.grad_fn).__name__ == "_ScaledLinearBackward" and y_f.dtype == torch.bfloat16
    assert rel_err(y_f.float(), y_e.float()) <= 1e-2
    errs = {k: rel_err(got[k].float(), want[k].float()) for k in want}
    assert all(e <= 3e-2 for e in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [1, 200, 1 << 20])
def test_scale_grads_over_blocks_of_tokens(chunk_bytes, dtype):
    """``g * scale`` and ``sum_t g * z`` over blocks of 1, 2 (the last one short) and all tokens."""
    gen = torch.Generator().manual_seed(15)
    g, z = (torch.randn(11, 12, generator=gen).to(dtype) for _ in range(2))
    scale = torch.rand(12, generator=gen).to(dtype)
    gz, dots = _scale_grads(g, z, scale, chunk_bytes=chunk_bytes)
    assert torch.equal(gz, g * scale)
    assert dots.dtype == dtype
    want = (g.double() * z.double()).sum(0)
    # bf16: each product rounded to bf16 (as (g * z).sum(0) does), the sum kept in float32.
    tol = 1e-14 if dtype == torch.float64 else 2e-2
    assert (dots.double() - want).abs().max().item() <= tol * want.abs().max().item()


# --------------------------------------------------------------------------- memory


def saved_big_tensors(module: nn.Module, fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors of at least ``OUT * IN`` elements that autograd saves while ``fn``
    runs, other than the module's own parameters (which exist whether saved or not)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
    big = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in param_ptrs and t.numel() >= OUT * IN:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return big


class MaterialisingDude(nn.Module):
    """The PEFT-DoRA way: build ``W_f + B A`` every forward (what DudeLinear must not do)."""

    def __init__(self, layer: DudeLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        lay = self.layer
        return reference_forward(lay, x, lay.lora_a, lay.lora_b, lay.magnitude, detach_norm=lay.norm_grad == "detach")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
def test_no_out_by_in_tensor_is_saved_for_backward(norm_grad, fused):
    layer = make_layer(norm_grad=norm_grad)
    layer.fused = fused
    x = torch.randn(2, 3, IN, requires_grad=True)  # 6 tokens * IN << OUT * IN

    def step(module):
        return lambda: module(x).square().sum().backward()

    assert saved_big_tensors(layer, step(layer)) == []
    assert layer.lora_a.grad is not None and layer.magnitude.grad is not None
    # The same check catches an implementation that materialises W_f + B A.
    caught = saved_big_tensors(layer, step(MaterialisingDude(layer)))
    assert (OUT, IN) in caught, f"the check failed to see the reference's [out, in] tensors: {caught}"


@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
def test_recompute_keeps_what_lora_keeps_with_the_same_gradients(norm_grad, test_device):
    layer = make_layer(norm_grad=norm_grad).double().to(test_device)
    gen = torch.Generator().manual_seed(3)
    tokens = 400  # many tokens: [tokens, out] outweighs everything else the layer keeps
    x0 = torch.randn(4, tokens // 4, IN, generator=gen, dtype=torch.float64).to(test_device)
    g = torch.randn(4, tokens // 4, OUT, generator=gen, dtype=torch.float64).to(test_device)
    results = {}
    for recompute in (False, True):
        layer.recompute = recompute
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        saved: dict[int, int] = {}

        def pack(t, params=params, saved=saved):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        (y * g).sum().backward()
        grads = {n: getattr(layer, n).grad.clone() for n in layer.adapter_params()}
        results[recompute] = (y.detach(), grads, x.grad.clone(), sum(saved.values()))
    (y0, g0, gx0, bytes0), (y1, g1, gx1, bytes1) = results[False], results[True]
    assert torch.allclose(y0, y1, rtol=1e-13, atol=1e-13)
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-11, atol=1e-12) for k in g0), max_diff(g0, g1)
    assert torch.allclose(gx0, gx1, rtol=1e-11, atol=1e-12)
    lora_keeps = 8 * tokens * (IN + RANK)  # x and x A^T, float64
    assert bytes1 <= lora_keeps + 8 * 4 * OUT * RANK, (bytes1, lora_keeps)  # plus [out]/[out, r]-sized pieces
    assert bytes0 >= lora_keeps + 8 * tokens * OUT  # the default keeps the pre-scale output too
    assert "recompute=True" in repr(layer)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
@pytest.mark.parametrize("zero_magnitude", [True, False])
def test_zero_norm_row_gives_finite_forward_and_backward(norm_grad, zero_magnitude):
    layer = make_layer(norm_grad=norm_grad)
    row = 5
    with torch.no_grad():
        layer.weight[row] = 0
        layer.weight_sq_norm.copy_(row_sq_norm(layer.weight))
        layer.lora_b[row] = 0
        if zero_magnitude:
            layer.magnitude[row] = 0
    assert layer.row_norm()[row].item() <= 1e-5  # the row really has (clamped) zero norm
    x = torch.randn(4, IN, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    # A zero direction contributes nothing: that output is the bias alone.
    torch.testing.assert_close(y[:, row], layer.bias[row].expand(4), rtol=0, atol=1e-6)
    y.square().sum().backward()
    for name in [*layer.adapter_params()]:
        assert torch.isfinite(getattr(layer, name).grad).all(), name
    assert torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert torch.isfinite(layer.merged_weight()).all()


def test_bfloat16_module_keeps_squared_norms_in_float32(test_device):
    layer = make_layer().to(test_device)
    sq32 = layer.weight_sq_norm.clone()
    x = torch.randn(3, IN).to(test_device)
    y32 = layer(x).detach()

    layer.bfloat16()
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == torch.bfloat16
    assert layer.weight_sq_norm.dtype == torch.float32
    assert torch.equal(layer.weight_sq_norm, sq32)  # not a bf16 round trip
    assert layer.row_norm().dtype == torch.float32
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    rel = ((y16.float() - y32).abs().max() / y32.abs().max()).item()
    assert rel < 2e-2, f"bf16 output off by {rel:.3g} relative"
    y16.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.bfloat16 and torch.isfinite(layer.lora_a.grad).all()

    # Back to float32 via a model-wide cast, as `model.to(dtype)` does.
    wrapper = nn.Sequential(layer).to(torch.float32)
    assert wrapper[0].weight_sq_norm.dtype == torch.float32
    assert "weight_sq_norm" not in layer.state_dict()  # derived, not saved


def test_row_norm_stays_float32_under_autocast():
    layer = make_layer()
    x = torch.randn(5, IN)
    with torch.no_grad():
        want = layer.row_norm()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer.row_norm()
            y = layer(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-6 * want.max().item()  # bf16 would be ~2e-3
    assert torch.isfinite(y).all()


def test_double_rebuilds_squared_norms_from_the_weight():
    layer = make_layer().double()
    assert layer.weight_sq_norm.dtype == torch.float64
    want = layer.weight.pow(2).sum(dim=1)
    assert (layer.weight_sq_norm - want).abs().max().item() <= 1e-12


def test_init_dude_makes_merged_weight_equal_w0():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(OUT, IN, generator=gen)
    fac = factorize(w0, RANK, variant="dude_b")
    layer = DudeLinear(IN, OUT, RANK)
    layer.init_dude(w0, fac.lora_a, fac.lora_b)
    assert (layer.merged_weight() - w0).abs().max().item() <= 1e-5 * w0.abs().max().item()
    assert torch.equal(layer.lora_a, fac.lora_a) and torch.equal(layer.lora_b, fac.lora_b)
    # The residual is what the top-r components leave: orthogonal to B A's row space.
    assert (layer.weight @ fac.lora_a.T).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- partial gradients, repr, norms


@pytest.mark.parametrize(("frozen", "x_grad", "norm_grad"), [
    ((), False, "exact"),  # an input that needs no gradient (the first layer's)
    (("lora_b",), True, "exact"),
    (("lora_a",), True, "exact"),
    (("magnitude",), True, "detach"),  # then the scale m / n needs no gradient at all
])
@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_custom_backward_with_some_inputs_frozen(frozen, x_grad, norm_grad, mode):
    """Each custom backward (recompute, fused) forms exactly the gradients asked for, equal
    to plain autograd's (``fused=False``)."""
    layer = make_layer(norm_grad=norm_grad).double()
    for name in frozen:
        getattr(layer, name).requires_grad_(False)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(3, 5, IN, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, OUT, generator=gen, dtype=torch.float64)
    results = {}
    for custom in (False, True):
        layer.fused = custom and mode == "fused"
        layer.recompute = custom and mode == "recompute"
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(x_grad)
        (layer(x) * g).sum().backward()
        results[custom] = ({n: getattr(layer, n).grad for n in layer.adapter_params()}, x.grad)
    (plain, plain_x), (custom, custom_x) = results[False], results[True]
    for name in layer.adapter_params():
        if name in frozen:
            assert plain[name] is None and custom[name] is None, name
        else:
            assert torch.allclose(custom[name], plain[name], rtol=1e-11, atol=1e-12), name
    assert (custom_x is None) == (plain_x is None) == (not x_grad)
    if x_grad:
        assert torch.allclose(custom_x, plain_x, rtol=1e-11, atol=1e-12)


def test_repr_names_the_configuration():
    plain = DudeLinear(IN, OUT, RANK)
    assert plain.extra_repr() == f"in_features={IN}, out_features={OUT}, rank={RANK}, bias=False, norm_grad=exact"
    layer = DudeLinear(IN, OUT, RANK, bias=True, norm_grad="detach", recompute=True)
    assert layer.extra_repr() == (f"in_features={IN}, out_features={OUT}, rank={RANK}, bias=True, "
                                  "norm_grad=detach, recompute=True")
    assert plain.fused and DudeLinear(IN, OUT, RANK, fused=False).extra_repr().endswith("norm_grad=exact, fused=False")


@pytest.mark.parametrize(("shape", "chunk_rows", "dtype"), [
    ((10, 7), 3, torch.float32), ((2050, 4), 1024, torch.float32), ((300, 40), 64, torch.bfloat16),
])
def test_row_sq_norm_matches_float64_in_chunks(shape, chunk_rows, dtype):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    want = weight.double().square().sum(dim=1)
    got = row_sq_norm(weight, chunk_rows=chunk_rows)
    assert got.dtype == torch.float32  # bf16 rows are summed in float32, not bf16 (~3e-3 off)
    assert (got.double() - want).abs().max().item() <= 1e-6 * want.max().item()


def test_low_precision_cast_of_a_float64_layer_keeps_float32_norms():
    layer = make_layer().double()
    want = layer.weight.float().double().square().sum(dim=1)
    layer.bfloat16()
    assert layer.weight_sq_norm.dtype == torch.float32
    assert (layer.weight_sq_norm.double() - want).abs().max().item() <= 1e-5 * want.max().item()


def test_new_layer_has_frozen_weight_and_bias_in_the_asked_dtype_and_device():
    layer = DudeLinear(IN, OUT, 1, bias=True, dtype=torch.float64)  # rank 1 is valid
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert all(getattr(layer, n).requires_grad for n in layer.adapter_params())
    assert {getattr(layer, n).dtype for n in ("weight", "bias", "lora_a", "lora_b", "magnitude")} == {torch.float64}
    assert layer.weight_sq_norm.dtype == torch.float64
    assert DudeLinear(IN, OUT, 2, dtype=torch.bfloat16).weight_sq_norm.dtype == torch.float32
    assert DudeLinear(IN, OUT, 2).bias is None and not DudeLinear(IN, OUT, 2).recompute
    meta = DudeLinear(IN, OUT, 2, device="meta")
    assert {t.device.type for t in (*meta.parameters(), meta.weight_sq_norm)} == {"meta"}
    # A cast and a move at once keeps the squared norms with the weight, in float32.
    moved = make_layer().to(device="meta", dtype=torch.bfloat16)
    assert moved.weight_sq_norm.device.type == "meta" and moved.weight_sq_norm.dtype == torch.float32


@pytest.mark.parametrize("mixed", [False, True])
def test_row_norm_of_a_bf16_weight_is_computed_in_float32(mixed):
    """A bf16 layer (``mixed``: bf16 weight, float32 factors and magnitude) sums its row norms
    in float32: within 1e-3 of float64 (measured 1.3e-4; only ``W_f A^T`` is formed in the
    weight's dtype), where bf16 sums are off by ~4e-3."""
    layer = make_layer()
    if mixed:
        layer.weight.data = layer.weight.data.bfloat16()
    else:
        layer.bfloat16()
    with torch.no_grad():
        layer.weight_sq_norm.copy_(row_sq_norm(layer.weight))
        full = layer.weight.double() + layer.lora_b.double() @ layer.lora_a.double()
        want = full.norm(dim=1)
        got = layer.row_norm()
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= 1e-3 * want.max().item()


def test_fused_detach_mode_saves_nothing_for_the_norm():
    """With ``norm_grad="detach"`` backward needs only ``n`` of the norm: the ``[out, r]``
    product, ``A A^T``, the float32 scale and the clamp mask are not kept."""
    saved = {}
    for mode in ("exact", "detach"):
        layer = make_layer(norm_grad=mode, bias=False)
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        shapes = []

        def pack(t, shapes=shapes, params=params):
            if t.untyped_storage().data_ptr() not in params:
                shapes.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(torch.randn(3, IN))
        saved[mode] = shapes
    assert ((OUT, RANK), torch.float32) in saved["exact"] and ((RANK, RANK), torch.float32) in saved["exact"]
    assert ((OUT, RANK), torch.float32) not in saved["detach"] and ((RANK, RANK), torch.float32) not in saved["detach"]
    assert len(saved["exact"]) - len(saved["detach"]) == 4, saved


def test_recompute_layer_without_grad_takes_the_fused_forward():
    """Evaluation of a ``recompute`` layer needs no saved tensors: the fused no-grad forward
    (same values as the training forward) is used."""
    layer = make_layer()
    layer.recompute = True
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y, layer(x).detach(), rtol=1e-6, atol=1e-6)
