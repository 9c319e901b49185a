"""Putting DuDe into Hugging Face models (dude_dist/adapters.py): step-0 equivalence on four
architectures, agreement with PEFT's DoRA+PiSSA, merge, target selection, state dicts.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_adapters.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from dude_dist import DudeConfig, DudeLinear, apply_dude, merge_dude
from dude_dist.adapters import dude_state_dict, find_targets, get_dude_layers, load_dude_state_dict
from tests.helpers import require

VOCAB = 128
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# Architecture -> (config class, DuDe targets). Qwen2 carries a bias on q/k/v; Phi-3 fuses qkv_proj.
ARCHS = {
    "qwen2": (Qwen2Config, ("q_proj", "k_proj", "v_proj")),
    "llama": (LlamaConfig, ("q_proj", "v_proj")),
    "mistral": (MistralConfig, ("q_proj", "v_proj")),
    "phi3": (Phi3Config, ("qkv_proj",)),
}


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A seeded random 2-layer causal LM in float32, eval mode, with non-zero biases."""
    config_cls, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**TINY), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for module in model.modules():
            # HF initialises biases to zero, which would leave the bias path untested.
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def tokens(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def perturb_adapters(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move A, B and m as some training steps would (relative to each tensor's size)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in get_dude_layers(model).values():
        for name in layer.adapter_params():
            p = getattr(layer, name)
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- step 0


@pytest.mark.parametrize("variant", ["dude", "dude_a", "dude_b"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_step0_logits_equal_original(arch, variant):
    model = tiny_model(arch)
    ids = tokens()
    before = logits(model, ids)
    targets = ARCHS[arch][1]
    apply_dude(model, DudeConfig(targets=targets, rank=8, variant=variant))

    layers = get_dude_layers(model)
    assert len(layers) == 2 * len(targets)  # every target of both decoder layers
    if arch == "qwen2":
        assert all(layer.bias is not None and layer.bias.abs().max() > 0 for layer in layers.values())
    diff = rel_max_diff(logits(model, ids), before)
    assert diff <= 1e-5, f"{arch}/{variant}: step-0 logits differ by {diff:.3g} of the logit scale"
    # Not vacuous: the factors carry most of each weight, the residual is not W0.
    layer = next(iter(layers.values()))
    assert (layer.lora_b @ layer.lora_a).norm() > 0.3 * layer.weight.norm()


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("variant", ["dude", "dude_a", "dude_b"])
def test_apply_dude_places_singular_values_as_the_variant_says(variant, svd):
    """``adapter.variant`` reaches the initialiser: with the singular values ``S_r`` of each
    original weight (an independent float64 SVD), ``dude_a`` has ``B^T B = I`` and
    ``A A^T = S_r^2``, ``dude_b`` the reverse, ``dude`` ``A A^T = B^T B = S_r`` (all three give
    the same ``B A`` and step-0 logits, so only the factors tell them apart)."""
    rank = 8
    model = tiny_model("llama", seed=3)
    originals = {name: m.weight.detach().double().clone() for name, m in model.named_modules()
                 if name.endswith(("q_proj", "v_proj"))}
    apply_dude(model, DudeConfig(targets=("q_proj", "v_proj"), rank=rank, variant=variant, svd=svd))
    layers = get_dude_layers(model)
    assert set(layers) == set(originals) and len(layers) == 4
    eye = torch.eye(rank, dtype=torch.float64)
    for name, layer in layers.items():
        s = torch.linalg.svdvals(originals[name])[:rank]
        a, b = layer.lora_a.detach().double(), layer.lora_b.detach().double()
        grams = {"aat": a @ a.T, "btb": b.T @ b}
        want = {"dude": {"aat": torch.diag(s), "btb": torch.diag(s)},
                "dude_a": {"aat": torch.diag(s**2), "btb": eye},
                "dude_b": {"aat": eye, "btb": torch.diag(s**2)}}[variant]
        # Randomized SVD approximates the singular values; its vectors are still orthonormal.
        tol = 1e-5 if svd == "exact" else 2e-3  # measured: <= 5e-4 (randomized, these weights)
        for key, gram in grams.items():
            scale = max(want[key].abs().max().item(), 1.0)
            assert (gram - want[key]).abs().max().item() <= tol * scale, (name, key, gram.diagonal(), want[key].diagonal())
            off = gram - torch.diag(gram.diagonal())
            assert off.abs().max().item() <= 1e-5 * scale, (name, key)


def test_step0_on_the_real_stories_model(stories_path):
    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    apply_dude(model, DudeConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank=4))
    diff = rel_max_diff(logits(model, ids), before)
    assert diff <= 1e-5, f"stories260K step-0 logits differ by {diff:.3g}"


def test_only_dude_parameters_train_and_the_base_weight_is_moved_not_copied():
    model = tiny_model("qwen2")
    q = model.model.layers[0].self_attn.q_proj
    weight, bias = q.weight, q.bias
    apply_dude(model, DudeConfig(targets=("q_proj",), rank=4))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DudeLinear)
    assert layer.weight is weight and layer.bias is bias  # a ZeRO-3 partition would stay one
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.q_proj.{p}" for i in (0, 1) for p in ("lora_a", "lora_b", "magnitude")}


# --------------------------------------------------------------------------- PEFT


def test_detach_mode_follows_peft_dora_with_pissa_init():
    """DuDe with ``norm_grad=detach`` is PEFT's DoRA on a PiSSA initialisation.

    Ordering, from PEFT's ``tuners/lora/layer.py`` (``LoraLayer.update_layer``) and
    ``tuners/lora/dora.py``: ``pissa_init`` runs first (SVD in float32 of the base weight,
    ``A = sqrt(S_r) Uh_r``, ``B = V_r sqrt(S_r)`` with ``S_r /= scaling``, then the base
    weight is replaced by the residual ``W - scaling * B A``); only after that does the DoRA
    variant's ``init`` compute the magnitude as ``||W_res + scaling * B A||_row``. DuDe does
    the same: residual first, magnitude from the stored residual plus ``B A``. With
    ``lora_alpha == r`` the scaling is 1, so the factors are the ``dude`` variant's. PEFT's
    forward detaches the row norm (DoRA §4.3), hence ``norm_grad=detach``.
    """
    peft = require("peft")
    rank, steps, lr = 4, 5, 0.5
    base = tiny_model("llama", seed=1)
    base.train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=rank, use_dora=True, init_lora_weights="pissa",
        target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
    ))
    ours = apply_dude(copy.deepcopy(base), DudeConfig(targets=("q_proj", "v_proj"), rank=rank,
                                                      variant="dude", norm_grad="detach"))
    exact = apply_dude(copy.deepcopy(base), DudeConfig(targets=("q_proj", "v_proj"), rank=rank,
                                                       variant="dude", norm_grad="exact"))

    # The initial products B A (not the singular vectors' signs) and magnitudes agree.
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_A}
    dude_layers = get_dude_layers(ours)
    assert set(peft_layers) == set(dude_layers) and len(dude_layers) == 4
    for name, layer in dude_layers.items():
        p = peft_layers[name]
        ba_peft = p.lora_B["default"].weight @ p.lora_A["default"].weight
        ba_dude = layer.lora_b @ layer.lora_a
        assert (ba_peft - ba_dude).abs().max().item() <= 1e-6 * ba_peft.abs().max().item(), name
        assert (p.base_layer.weight - layer.weight).abs().max().item() <= 1e-6, name
        mag_peft = p.lora_magnitude_vector["default"].weight
        assert (mag_peft - layer.magnitude).abs().max().item() <= 1e-6 * mag_peft.abs().max().item(), name

    ids = tokens(seed=3, batch=4, seq=16)

    def trajectory(model: nn.Module) -> list[float]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    peft_losses, dude_losses = trajectory(theirs), trajectory(ours)
    gaps = [abs(a - b) for a, b in zip(peft_losses, dude_losses)]
    assert max(gaps) <= 1e-5, f"PEFT {peft_losses} vs DuDe {dude_losses}"
    assert peft_losses[0] - peft_losses[-1] > 1e-2, f"training barely moved the loss: {peft_losses}"
    # The comparison can tell the two norm gradients apart: the paper's exact mode drifts away.
    exact_losses = trajectory(exact)
    assert exact_losses[0] == dude_losses[0]
    assert max(abs(a - b) for a, b in zip(peft_losses, exact_losses)) > 1e-4, exact_losses


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_merge_gives_a_plain_model_with_the_trained_logits(arch):
    original = tiny_model(arch)
    keys = set(original.state_dict())
    model = apply_dude(copy.deepcopy(original), DudeConfig(targets=ARCHS[arch][1], rank=8))
    perturb_adapters(model, seed=2)
    ids = tokens(seed=4)
    trained = logits(model, ids)
    assert rel_max_diff(trained, logits(original, ids)) > 1e-3  # the perturbation mattered
    # The reference W' = m (W_f + B A) / ||W_f + B A||_row, materialised in float64 (not row_norm).
    want = {}
    for name, layer in get_dude_layers(model).items():
        full = layer.weight.double() + layer.lora_b.detach().double() @ layer.lora_a.detach().double()
        want[name] = layer.magnitude.detach().double()[:, None] * full / full.norm(dim=1, keepdim=True)

    merged = merge_dude(model)
    for name, weight in want.items():
        got = merged.get_submodule(name).weight.double()
        assert (got - weight).abs().max().item() <= 1e-6 * weight.abs().max().item(), name
    assert not any(isinstance(m, DudeLinear) for m in merged.modules())
    for name in ARCHS[arch][1]:
        layer = merged.get_submodule(f"model.layers.0.self_attn.{name}")
        assert type(layer) is nn.Linear
    assert set(merged.state_dict()) == keys
    diff = rel_max_diff(logits(merged, ids), trained)
    assert diff <= 1e-5, f"merged logits differ from the DuDe model's by {diff:.3g}"

    # Loadable into a fresh plain model of the same config (no dude_dist involved).
    fresh = tiny_model(arch, seed=9)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert rel_max_diff(logits(fresh, ids), trained) <= 1e-5


# --------------------------------------------------------------------------- targets


def test_targets_matching_nothing_list_the_linear_names():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="nonexistent") as info:
        find_targets(model, DudeConfig(targets=("nonexistent",), rank=4))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "lm_head"):
        assert name in str(info.value)
    assert not any(isinstance(m, DudeLinear) for m in model.modules())


def test_rank_above_a_layer_dimension_names_the_layer():
    model = tiny_model("llama")  # v_proj is [32, 64]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj.*\[32, 64\]"):
        apply_dude(model, DudeConfig(targets=("q_proj", "v_proj"), rank=33))
    assert not any(isinstance(m, DudeLinear) for m in model.modules())  # checked before any change
    assert len(find_targets(model, DudeConfig(targets=("q_proj", "v_proj"), rank=32))) == 4


def test_regex_targets_select_full_names():
    model = tiny_model("llama")
    names = find_targets(model, DudeConfig(targets=(r"re:model\.layers\.1\.self_attn\.(q|v)_proj",), rank=4))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    # A plain suffix matches whole name components only ("proj" is not "q_proj").
    with pytest.raises(ValueError):
        find_targets(model, DudeConfig(targets=("proj",), rank=4))


# --------------------------------------------------------------------------- state dicts


def test_dude_state_dict_round_trip():
    cfg = DudeConfig(targets=("qkv_proj",), rank=8, variant="dude_a")
    trained = apply_dude(tiny_model("phi3"), cfg)
    perturb_adapters(trained, seed=5)
    state = dude_state_dict(trained)
    assert set(state) == {f"model.layers.{i}.self_attn.qkv_proj.{p}" for i in (0, 1) for p in ("lora_a", "lora_b", "magnitude")}

    fresh = apply_dude(tiny_model("phi3"), cfg)
    ids = tokens(seed=6)
    assert rel_max_diff(logits(fresh, ids), logits(trained, ids)) > 1e-4
    load_dude_state_dict(fresh, state)
    assert torch.equal(logits(fresh, ids), logits(trained, ids))
    # The state is a copy, not a view of the live parameters.
    with torch.no_grad():
        get_dude_layers(trained)["model.layers.0.self_attn.qkv_proj"].lora_a.add_(1.0)
    assert torch.equal(state["model.layers.0.self_attn.qkv_proj.lora_a"],
                       get_dude_layers(fresh)["model.layers.0.self_attn.qkv_proj"].lora_a)

    missing = dict(state)
    del missing["model.layers.1.self_attn.qkv_proj.magnitude"]
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.qkv_proj\.magnitude"):
        load_dude_state_dict(fresh, missing)
    wrong = dict(state)
    wrong["model.layers.0.self_attn.qkv_proj.lora_a"] = torch.zeros(4, 64)
    with pytest.raises(ValueError, match=r"qkv_proj\.lora_a.*\(4, 64\).*\(8, 64\)"):
        load_dude_state_dict(fresh, wrong)
