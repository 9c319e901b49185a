"""dude_dist/dynamics.py: the factored dude/* quantities equal the materialised ones (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dude_dist import dynamics
from dude_dist.dude import DudeLinear
from dude_dist.dynamics import DudeDynamics, LayerDynamics, layer_dynamics, pool


def _layer(out_f: int, in_f: int, rank: int, seed: int, dtype=torch.float64) -> tuple[DudeLinear, dict]:
    """A DuDe layer filled from a random W0 and its top-r SVD factors, and its step-0 tensors."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    layer = DudeLinear(in_f, out_f, rank, dtype=dtype)
    layer.init_dude(w0.to(dtype), (s[:rank, None].sqrt() * vh[:rank]).to(dtype),
                    (u[:, :rank] * s[:rank].sqrt()).to(dtype))
    ref = {k: getattr(layer, k).detach().clone() for k in ("lora_a", "lora_b", "magnitude")}
    return layer, ref


def _move(layer: DudeLinear, size: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_a, layer.lora_b, layer.magnitude):
            p.add_(size * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@torch.no_grad()
def _materialised(layer: DudeLinear, ref: dict) -> LayerDynamics:
    """The definitions on [out, in] matrices, float64; 1 - cos from the unit rows' difference."""
    wf = layer.weight.double()
    v = wf + layer.lora_b.double() @ layer.lora_a.double()
    v0 = wf + ref["lora_b"].double() @ ref["lora_a"].double()
    unit = v / v.norm(dim=1, keepdim=True)
    unit0 = v0 / v0.norm(dim=1, keepdim=True)
    one_minus_cos = (unit - unit0).square().sum(dim=1) / 2  # = 1 - cos, without cancellation
    m, m0 = layer.magnitude.double(), ref["magnitude"].double()
    return LayerDynamics(one_minus_cos=float(one_minus_cos.sum()), rows=layer.out_features,
                         update_sq=float((v - v0).square().sum()), w0_sq=float(v0.square().sum()),
                         magnitude_sq=float((m - m0).square().sum()), m0_sq=float(m0.square().sum()))


@pytest.mark.parametrize("size", [1e-1, 1e-3, 1e-7])
def test_factored_quantities_equal_the_materialised_ones(size):
    layer, ref = _layer(24, 40, 4, seed=1)
    _move(layer, size, seed=2)
    got = layer_dynamics(layer, ref["lora_a"], ref["lora_b"], ref["magnitude"]).scalars()
    want = _materialised(layer, ref).scalars()
    for key in want:
        assert want[key] > 0, key
        assert math.isclose(got[key], want[key], rel_tol=1e-6), (key, got[key], want[key])


def test_nothing_moved_is_zero_and_a_sign_flip_of_a_row_is_two():
    layer, ref = _layer(16, 32, 4, seed=3)
    assert layer_dynamics(layer, ref["lora_a"], ref["lora_b"], ref["magnitude"]).scalars() == {
        "magnitude_drift": 0.0, "direction_change": 0.0, "update_norm": 0.0}
    # Row 0 of V = W_f + B A turned around: B_0 -> B_0 - 2 V_0 A^+ is not low-rank in general, so
    # flip the whole layer instead: W_f = 0 and B -> -B gives V = -V0, cos = -1 on every row.
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight_sq_norm.zero_()
    ref = {k: getattr(layer, k).detach().clone() for k in ("lora_a", "lora_b", "magnitude")}
    with torch.no_grad():
        layer.lora_b.neg_()
    got = layer_dynamics(layer, ref["lora_a"], ref["lora_b"], ref["magnitude"]).scalars()
    assert got["direction_change"] == pytest.approx(2.0, rel=1e-12)
    assert got["update_norm"] == pytest.approx(2.0, rel=1e-12)  # ||-2 B0 A0|| / ||B0 A0||


def test_layers_pool_as_one_matrix_and_the_hooks_measure_in_the_forward(monkeypatch):
    (l1, r1), (l2, r2) = _layer(12, 20, 3, seed=4), _layer(8, 20, 2, seed=5)
    model = nn.ModuleDict({"q_proj": l1, "v_proj": l2})
    dyn = DudeDynamics(model)
    dyn.arm()
    x = torch.randn(3, 20, dtype=torch.float64)
    l1(x), l2(x)  # step 1's forward takes the reference
    assert dyn.collect() == {"dude/magnitude_drift": 0.0, "dude/direction_change": 0.0, "dude/update_norm": 0.0}
    _move(l1, 1e-2, seed=6)
    _move(l2, 3e-2, seed=7)
    calls = []
    real = dynamics.layer_sums
    monkeypatch.setattr(dynamics, "layer_sums", lambda *a: calls.append(1) or real(*a))
    dyn.arm()
    l1(x), l2(x)
    l1(x)  # a second forward (accumulation, recompute) measures nothing again
    assert len(calls) == 2
    got = dyn.collect()
    parts = [_materialised(l1, r1), _materialised(l2, r2)]
    want = pool(parts).scalars()
    for key, value in want.items():
        assert got[f"dude/{key}"] == pytest.approx(value, rel=1e-6), key
    # pooled over rows: not the mean of the two layers' means (12 and 8 rows)
    mean_of_means = (parts[0].scalars()["direction_change"] + parts[1].scalars()["direction_change"]) / 2
    assert got["dude/direction_change"] != pytest.approx(mean_of_means, rel=1e-3)
    hist = dyn.histograms()
    assert hist["dude/direction_change/q_proj"] == [pytest.approx(parts[0].scalars()["direction_change"], rel=1e-6)]
    assert hist["dude/magnitude_drift/v_proj"] == [pytest.approx(parts[1].scalars()["magnitude_drift"], rel=1e-6)]
    assert dyn.collect() == {}  # disarmed: nothing measured since


def test_the_reference_round_trips_and_a_wrong_one_turns_the_dynamics_off(tmp_path, caplog):
    layer, ref = _layer(8, 16, 2, seed=8)
    model = nn.ModuleDict({"q_proj": layer})
    path = tmp_path / "ref.safetensors"
    dyn = DudeDynamics(model, save_to=path)
    dyn.arm()
    layer(torch.randn(2, 16, dtype=torch.float64))
    dyn.collect()
    assert path.is_file()
    _move(layer, 1e-2, seed=9)
    again = DudeDynamics.load(model, path)
    again.arm()
    layer(torch.randn(2, 16, dtype=torch.float64))
    assert again.collect()["dude/update_norm"] == pytest.approx(_materialised(layer, ref).scalars()["update_norm"],
                                                                rel=1e-6)
    other = nn.ModuleDict({"k_proj": layer})
    assert DudeDynamics.load(other, path) is None
    assert DudeDynamics.load(model, tmp_path / "missing.safetensors") is None


def test_bf16_weight_is_read_a_block_of_rows_at_a_time_without_a_float_copy(monkeypatch):
    """The only products with W_f are [rows, in] x [in, 2r] blocks within the float32 byte
    budget (here 300 rows of 64); no [out, in] float tensor."""
    from dude_dist import dynamics

    monkeypatch.setattr(dynamics._weight_products, "__defaults__", (300 * 64 * 4,))
    layer, ref = _layer(2048 + 5, 64, 4, seed=10, dtype=torch.bfloat16)
    _move(layer, 1e-2, seed=11)
    seen = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.dim() == 2 and out.shape[1] == 64 and out.dtype == torch.float32:
            seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    got = layer_dynamics(layer, ref["lora_a"], ref["lora_b"], ref["magnitude"]).scalars()
    monkeypatch.undo()
    assert seen == [8] + [300] * 6 + [2053 - 1800], seen  # the factors [2r, in], then the blocks
    want = _materialised(layer, ref).scalars()
    assert got["update_norm"] == pytest.approx(want["update_norm"], rel=1e-4)
    assert got["direction_change"] == pytest.approx(want["direction_change"], rel=1e-2)
