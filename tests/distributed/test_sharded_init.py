"""Rank-aware sharded initialisation under ZeRO-3 on 2 and 3 CPU ranks (gloo)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dude_dist import DudeConfig, apply_dude
from dude_dist.sharded_init import plan_init
from tests.helpers import launcher_cmd, run

pytestmark = pytest.mark.slow


_REFERENCES: dict[str, tuple] = {}


def reference(stories_path, svd: str):
    """stories260K with DuDe applied in this process (``svd`` exact or randomized), and its original logits."""
    from transformers import AutoModelForCausalLM

    if svd not in _REFERENCES:
        model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
        ids = torch.arange(24).remainder(500).view(2, 12) + 3
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        apply_dude(model, DudeConfig(rank=4, svd=svd))
        _REFERENCES[svd] = (model, logits)
    return _REFERENCES[svd]


@pytest.mark.parametrize(("nproc", "svd"), [(2, "exact"), (3, "exact"), (2, "randomized")])
def test_sharded_init_matches_single_process(nproc, svd, stories_path, tmp_path):
    """Every rank's factors, residual and norms equal one process's (the randomized SVD is
    seeded per layer name, so the owner rank computes what one process computes)."""
    run(launcher_cmd(nproc) + ["tests/distributed/init_worker.py", str(stories_path), str(tmp_path), svd],
        timeout=300)
    got = load_file(str(tmp_path / "init.safetensors"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    model, original_logits = reference(stories_path, svd)
    modules = dict(model.named_modules())
    assert stats["partitioned"], "the worker's weights were not ZeRO-3 partitions"
    checked = 0
    for key, value in got.items():
        if key == "logits":
            continue
        name, attr = key.rsplit(".", 1)
        expected = getattr(modules[name], attr).detach()
        diff = (expected - value).abs().max().item()
        assert diff <= 1e-6, f"{key}: max |diff| {diff:.3g} vs single-process apply_dude"
        checked += 1
    assert checked == 10 * 5  # 5 layers x (q, v) x (weight, lora_a, lora_b, magnitude, weight_sq_norm)
    if svd == "randomized":  # the worker factorised by the randomized method, not the exact one
        exact = dict(reference(stories_path, "exact")[0].named_modules())
        name = "model.layers.0.self_attn.q_proj"
        gap = (exact[name].lora_b @ exact[name].lora_a - got[f"{name}.lora_b"] @ got[f"{name}.lora_a"]).abs().max()
        assert gap.item() > 1e-5, gap
    scale = original_logits.abs().max().item()
    assert (got["logits"] - original_logits).abs().max().item() / scale <= 1e-5

    # Work was shared out, and only the factors crossed the wire.
    r = 4
    shapes = [(m.out_features, m.in_features) for n, m in modules.items() if n.endswith(("q_proj", "v_proj"))]
    assert stats["svd_count"] == 10
    assert sum(stats["layers_per_rank"]) == 10 and min(stats["layers_per_rank"]) >= 1
    # A0 [r, in] and B0 [out, r]; each rank computes m0 from its own shard and the factors.
    assert stats["bytes_broadcast"] == sum(4 * r * (i + o) for o, i in shapes)
    assert stats["bytes_residual_broadcast"] == sum(4 * o * i for o, i in shapes)


def test_plan_eight_equal_layers_on_two_ranks_is_four_four():
    shapes = {f"model.layers.{i}.q_proj": (512, 512) for i in range(8)}
    plan = plan_init(shapes, 2, DudeConfig(rank=16))
    assert [len(plan.layers_of(r)) for r in range(2)] == [4, 4]
    assert plan.load[0] == plan.load[1]
    assert plan == plan_init(dict(shapes), 2, DudeConfig(rank=16))  # deterministic


def test_plan_balances_unequal_layers():
    shapes = {"a": (4096, 4096), "b": (4096, 1024), "c": (4096, 1024), "d": (4096, 1024), "e": (4096, 1024)}
    plan = plan_init(shapes, 2, DudeConfig(rank=16, svd="exact"))
    assert plan.owners["a"] != plan.owners["b"]
    # LPT: the big layer alone on one rank, the four small ones on the other.
    assert sorted(len(plan.layers_of(r)) for r in range(2)) == [1, 4]
