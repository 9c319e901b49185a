"""Top-r factorisation (dude_dist/svd_init.py): variants, randomized SVD accuracy, speed, seeding.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_svd_init.py -q
"""

from __future__ import annotations

import time

import pytest
import torch

from dude_dist.svd_init import (
    VARIANTS,
    exact_svd,
    factorize,
    layer_seed,
    randomized_svd,
    squared_norm,
    svd_cost,
)

RANK = 16


def decaying_matrix(n: int, spectrum: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = U diag(s) V^T`` with random orthogonal ``U, V`` and a known, decaying ``s``."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    s = 1.0 / i if spectrum == "power" else torch.exp(-i / 8)
    return ((u * s) @ v.T).float(), s


def rel_error(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    return ((w - lora_b @ lora_a).norm() / w.norm()).item()


@pytest.fixture(scope="module")
def w1024() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {spec: decaying_matrix(1024, spec) for spec in ("power", "exp")}


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("spectrum", ["power", "exp"])
def test_randomized_error_is_within_1e5_of_exact_on_1024(w1024, spectrum):
    w, s = w1024[spectrum]
    exact = factorize(w, RANK, method="exact")
    rand = factorize(w, RANK, method="randomized", name="model.layers.0.self_attn.q_proj")
    err_exact, err_rand = rel_error(w, exact.lora_a, exact.lora_b), rel_error(w, rand.lora_a, rand.lora_b)
    # Eckart-Young: the best rank-r error is the tail of the spectrum.
    optimal = (s[RANK:].square().sum() / s.square().sum()).sqrt().item()
    assert abs(err_exact - optimal) <= 1e-4, (err_exact, optimal)
    # Measured excess with the defaults (oversample 16, 4 power iterations): <= 2e-8.
    assert abs(err_rand - err_exact) <= 1e-5, f"randomized {err_rand:.8f} vs exact {err_exact:.8f}"
    assert err_rand >= err_exact - 1e-5  # nothing beats the optimum
    # Energy: the fraction of ||W||_F^2 in the top-r components (measured gap <= 6e-7).
    want_energy = (s[:RANK].square().sum() / s.square().sum()).item()
    assert abs(exact.energy - want_energy) <= 1e-4
    assert abs(rand.energy - exact.energy) <= 1e-5
    # The bound tells the power iterations apart: without them the excess is >= 5e-3.
    crude = factorize(w, RANK, method="randomized", name="model.layers.0.self_attn.q_proj", niter=0)
    assert rel_error(w, crude.lora_a, crude.lora_b) - err_exact > 1e-3


def test_randomized_is_at_least_20x_faster_than_exact_at_2048():
    # Timed in CPU seconds of this process (not wall time, which other processes on a busy
    # machine stretch), with whatever torch.get_num_threads() the environment gives.
    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    randomized_svd(w, RANK)  # warm-up (allocator, BLAS threads)
    rand_s = min(_timed(lambda: randomized_svd(w, RANK)) for _ in range(3))
    exact_s = _timed(lambda: exact_svd(w, RANK))  # once: this is the slow part of the unit tests
    speedup = exact_s / rand_s
    assert speedup >= 20, (
        f"randomized {rand_s * 1e3:.1f} ms vs exact {exact_s * 1e3:.1f} ms at 2048^2: only {speedup:.1f}x "
        f"({torch.get_num_threads()} threads)"
    )


def _timed(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


# --------------------------------------------------------------------------- seeding


def test_randomized_factors_are_bitwise_reproducible_per_name_and_seed():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(4))
    kw = {"method": "randomized", "oversample": 8, "niter": 2}
    a = factorize(w, 8, name="layers.3.q_proj", seed=7, **kw)
    b = factorize(w, 8, name="layers.3.q_proj", seed=7, **kw)
    assert torch.equal(a.lora_a, b.lora_a) and torch.equal(a.lora_b, b.lora_b)
    # Pinned: a change of the derivation would silently change every cached randomized factor.
    assert layer_seed("layers.3.q_proj", 7) == 4735989351795661000
    assert layer_seed("") == 7812857082101331642
    assert layer_seed("model.layers.0.self_attn.v_proj") == 8653765224161291501  # odd: all 63 bits count
    assert len({layer_seed("layers.3.q_proj", 7), layer_seed("layers.3.v_proj", 7), layer_seed("layers.3.q_proj", 8)}) == 3


def test_different_name_or_seed_gives_a_different_test_matrix():
    # A flat spectrum, no power iterations and no oversampling: the subspace found is then
    # mostly the random test matrix's, so a different Gaussian draw shows up plainly.
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(5))
    kw = {"method": "randomized", "oversample": 0, "niter": 0}
    base = factorize(w, 8, name="layers.0.q_proj", **kw)
    base_ba = base.lora_b @ base.lora_a
    for other in (factorize(w, 8, name="layers.0.v_proj", **kw), factorize(w, 8, name="layers.0.q_proj", seed=1, **kw)):
        diff = ((other.lora_b @ other.lora_a - base_ba).norm() / base_ba.norm()).item()
        assert diff > 0.1, f"a different seed changed B@A by only {diff:.3g}"


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_variants_share_b_at_a_and_place_singular_values_as_specified(method):
    w, s = decaying_matrix(128, "exp", seed=1)
    w = w[:96]  # non-square [96, 128]
    u, s_r, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :RANK] * s_r[:RANK]) @ vh[:RANK]  # U_r S_r V_r^T in float64
    products = {}
    for variant in VARIANTS:
        fac = factorize(w, RANK, variant=variant, method=method, name="x")
        assert fac.lora_a.shape == (RANK, 128) and fac.lora_b.shape == (96, RANK)
        assert fac.lora_a.dtype == fac.lora_b.dtype == torch.float32
        products[variant] = (fac.lora_b @ fac.lora_a).double()
        eye = torch.eye(RANK)
        if variant == "dude_a":
            assert (fac.lora_b.T @ fac.lora_b - eye).abs().max().item() <= 1e-5  # B = U_r
        if variant == "dude_b":
            assert (fac.lora_a @ fac.lora_a.T - eye).abs().max().item() <= 1e-5  # A = V_r^T
        if variant == "dude":  # sqrt(S) on both sides: equal Gram matrices, diag(S_r)
            ga, gb = fac.lora_a @ fac.lora_a.T, fac.lora_b.T @ fac.lora_b
            assert (ga - gb).abs().max().item() <= 1e-5 * s_r[0].item()
            assert (ga.diagonal() - s_r[:RANK]).abs().max().item() <= 1e-5 * s_r[0].item()
    scale = best.abs().max().item()
    for variant, prod in products.items():
        assert (prod - best).abs().max().item() <= 1e-5 * scale, variant
        assert (prod - products["dude"]).abs().max().item() <= 1e-6 * scale, variant


def test_low_precision_weight_is_factorised_in_float32():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(6)).bfloat16()
    fac = factorize(w, 4)
    assert fac.lora_a.dtype == torch.float32
    want = factorize(w.float(), 4)
    assert torch.equal(fac.lora_a, want.lora_a) and torch.equal(fac.lora_b, want.lora_b)


# --------------------------------------------------------------------------- errors and cost


def test_bad_rank_variant_method_are_named():
    w = torch.zeros(8, 6)
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj.*rank 7.*min\(out, in\) = 6"):
        factorize(w, 7, name="layers.1.q_proj")
    with pytest.raises(ValueError, match="rank 0"):
        factorize(w, 0)
    with pytest.raises(ValueError, match="'dude_c'.*dude_a"):
        factorize(w, 2, variant="dude_c")
    with pytest.raises(ValueError, match="'lanczos'.*randomized"):
        factorize(w, 2, method="lanczos")
    with pytest.raises(ValueError, match="2-D"):
        factorize(torch.zeros(2, 3, 4), 1)


def test_zero_weight_has_zero_energy_and_finite_factors():
    fac = factorize(torch.zeros(8, 6), 2)
    assert fac.energy == 0.0
    assert torch.isfinite(fac.lora_a).all() and torch.isfinite(fac.lora_b).all()


def test_svd_cost_orders_methods():
    exact = svd_cost(8192, 8192, 16, "exact")
    rand = svd_cost(8192, 8192, 16, "randomized", oversample=16, niter=4)
    assert exact == 8192.0**3
    assert rand == 8192.0 * 8192 * 32 * 10
    assert svd_cost(8192, 1024, 16, "exact") == 8192.0 * 1024 * 1024


def test_randomized_factors_ignore_the_default_dtype_and_default_to_seed_0():
    w = torch.randn(80, 48, generator=torch.Generator().manual_seed(10))
    want = randomized_svd(w, 6, oversample=16, niter=4, seed=0)  # the documented defaults
    assert all(torch.equal(a, b) for a, b in zip(randomized_svd(w, 6), want))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as some user code does; the test matrix stays float32
    try:
        got = randomized_svd(w, 6, seed=0)
    finally:
        torch.set_default_dtype(previous)
    assert all(t.dtype == torch.float32 for t in got)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_svd_cost_caps_the_sketch_at_the_smaller_side_and_uses_the_documented_defaults():
    # k = min(rank + oversample, out, in); randomized cost out * in * k * (2 niter + 2).
    assert svd_cost(8, 1024, 16, "randomized") == 8.0 * 1024 * 8 * 10
    assert svd_cost(1024, 8, 16, "randomized") == 1024.0 * 8 * 8 * 10
    assert svd_cost(512, 512, 16, "randomized") == 512.0 * 512 * 32 * 10  # oversample 16, niter 4


def test_unknown_variant_in_split_lists_the_valid_ones():
    from dude_dist.svd_init import split_singular_values

    u, s, vh = exact_svd(torch.eye(4), 2)
    with pytest.raises(ValueError, match=r"^unknown variant 'dude_c'; valid: dude, dude_a, dude_b$"):
        split_singular_values(u, s, vh, "dude_c")


def test_measured_svd_throughput_is_a_plausible_rate():
    from dude_dist.svd_init import measure_svd_gflops

    # CPU SVD runs at 0.1-1000 Gflop/s in svd_cost's units; seconds or a 1e9 misplaced is far off.
    for method in ("exact", "randomized"):
        rate = measure_svd_gflops(16, method, size=128)
        assert 0.1 < rate < 1e4, (method, rate)


@pytest.mark.parametrize(("method", "kwargs"), [("exact", {}), ("randomized", {"oversample": 4, "niter": 1})])
def test_measured_svd_throughput_is_cost_over_the_timed_seconds(monkeypatch, method, kwargs):
    from dude_dist.svd_init import measure_svd_gflops

    clock = iter([100.0, 102.5])  # the timed factorisation takes 2.5 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    rate = measure_svd_gflops(8, method, size=64, **kwargs)
    want = svd_cost(64, 64, 8, method, oversample=kwargs.get("oversample", 8), niter=kwargs.get("niter", 2))
    assert rate == want / 2.5 / 1e9


def test_squared_norm_is_the_float64_frobenius_norm_across_chunk_boundaries():
    weight = (torch.randn(2500, 96, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    want = weight.double().square().sum().item()
    for chunk in (1, 7, 1024, 4096):
        assert squared_norm(weight, chunk_rows=chunk) == pytest.approx(want, rel=1e-12)


def test_randomized_factorisation_makes_one_float32_copy_of_the_weight():
    """The range finder multiplies with one float32 copy; the energy is summed a block at a time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    out_f, in_f = 2048, 512
    made: list[tuple[str, torch.dtype]] = []

    class Large(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.numel() >= out_f * in_f and not func.is_view:
                    made.append((str(func), t.dtype))
            return result

    weight = torch.randn(out_f, in_f).to(torch.bfloat16)
    with Large():
        factorize(weight, RANK, method="randomized", name="w")
    assert made == [("aten._to_copy.default", torch.float32)], made
