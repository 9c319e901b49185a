"""DuDe in bf16: the step-0 output is the base model's, and one step's gradients match fp32.

The device comes from ``DUDE_TEST_DEVICE`` (default ``cpu``; ``benchmarks/gpu_check.py``
runs this file with ``cuda``).

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_bf16.py -q
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from dude_dist import DudeConfig, apply_dude
from dude_dist.adapters import get_dude_layers
from dude_dist.config import batch_layout
from dude_dist.config_loader import load_config
from dude_dist.loss import token_loss_sum
from dude_dist.zero import build_ds_config

DEVICE = torch.device(os.environ.get("DUDE_TEST_DEVICE", "cpu"))
BF16_UNIT_ROUNDOFF = 2.0**-8  # largest relative rounding error of one bf16 value (8 significant bits)


class Block(nn.Module):
    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(in_features, out_features, bias=False)


def _bf16_block(out_features: int, in_features: int, seed: int = 0) -> nn.Module:
    """A weight with a decaying spectrum (like a trained one), stored in bf16."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen))
    k = min(out_features, in_features)
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / 40.0)
    block = Block(out_features, in_features)
    with torch.no_grad():
        block.q_proj.weight.copy_((u[:, :k] * s) @ v[:, :k].T)
    return block.to(device=DEVICE, dtype=torch.bfloat16)


def test_step0_magnitude_is_the_rounded_norm_of_the_stored_bf16_factors():
    """``m`` is the bf16 rounding of ``||W_f + B A||`` per row, with ``W_f``, ``A``, ``B`` as
    stored in bf16: the only step-0 error left is rounding ``m`` itself (a bf16 parameter),
    at most the unit roundoff 2^-8 per row, the same as storing ``W0`` in bf16 costs. A
    magnitude computed from the float32 factors before they were rounded misses the
    rounded norm in ~5% of rows here (up to 4.5e-3 relative)."""
    block = _bf16_block(1024, 1024)
    apply_dude(block, DudeConfig(targets=("q_proj",), rank=16, svd="exact"))
    layer = block.q_proj
    assert layer.lora_a.dtype == torch.bfloat16 and layer.magnitude.dtype == torch.bfloat16
    with torch.no_grad():
        # The row norm of the stored tensors, materialised in float64 (an independent oracle).
        norm = (layer.weight.double() + layer.lora_b.double() @ layer.lora_a.double()).norm(dim=1)
        exact_rows = (layer.magnitude == norm.to(torch.bfloat16)).double().mean().item()
        worst = (layer.magnitude.double() / norm - 1).abs().max().item()
    assert exact_rows >= 0.999, f"only {exact_rows:.4f} of rows hold the rounded stored norm"
    assert worst <= BF16_UNIT_ROUNDOFF, f"max |m/n - 1| = {worst:.3g} > {BF16_UNIT_ROUNDOFF:.3g}"


def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(device=DEVICE, dtype=dtype).eval()


@torch.no_grad()
def test_step0_logits_equal_the_bf16_base_model_within_bf16_rounding():
    """DuDe in bf16 at step 0 against the same base model in bf16, measured against the
    error bf16 itself makes (the bf16 base model against its float32 twin): DuDe adds at most
    what rounding ``m`` costs, a fraction of that."""
    base32 = _tiny_llama(torch.float32)
    base16 = copy.deepcopy(base32).to(torch.bfloat16)
    dude16 = apply_dude(copy.deepcopy(base16), DudeConfig(targets=("q_proj", "v_proj"), rank=8, svd="exact"))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = base32(input_ids=ids).logits.double()
    bf16_noise = (base16(input_ids=ids).logits.double() - ref).abs().max().item()
    dude_vs_base = (dude16(input_ids=ids).logits.double() - base16(input_ids=ids).logits.double()).abs().max().item()
    assert bf16_noise > 0
    assert dude_vs_base <= 1.5 * bf16_noise, (dude_vs_base, bf16_noise)


def test_one_step_gradients_in_bf16_match_float32():
    """Gradients of A, B, m from the bf16 model against the same stored values in float32:
    bf16 keeps 8 significant bits, so a relative error (Frobenius, per parameter) of a few
    1e-2 is what its matmuls cost; 0.05 is the stated bound."""
    model16 = apply_dude(_tiny_llama(torch.bfloat16), DudeConfig(targets=("q_proj", "v_proj"), rank=8, svd="exact"))
    model32 = copy.deepcopy(model16).float()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for model in (model16, model32):
        model.train()
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
    layers16, layers32 = get_dude_layers(model16), get_dude_layers(model32)
    worst = 0.0
    for name, layer in layers16.items():
        for pname in layer.adapter_params():
            g16 = getattr(layer, pname).grad.double()
            g32 = getattr(layers32[name], pname).grad.double()
            assert torch.isfinite(g16).all()
            worst = max(worst, ((g16 - g32).norm() / g32.norm()).item())
    assert worst < 0.05, worst


def test_bf16_runs_accumulate_and_reduce_dude_gradients_in_fp32():
    cfg = load_config(None, ["model.name_or_path=x", "model.dtype=bfloat16"])
    ds = build_ds_config(cfg, batch_layout(cfg.train, 8))
    assert ds["bf16"]["enabled"] is True
    assert ds["communication_data_type"] == "fp32"
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = load_config(None, ["model.name_or_path=x", "model.dtype=float32"])
    assert "data_types" not in build_ds_config(fp32, batch_layout(fp32.train, 8))
