"""Rebuild a trained DuDe model from (base weights + factor cache + trainable tensors), and
export it as a plain Hugging Face folder with ``W'`` folded into ordinary Linear weights.

Under ZeRO-3 (``deepspeed --num_gpus N launch/export.py ...``) every rank holds a 1/N
shard of the base model; the export gathers one parameter group (a decoder layer's
parameters) at a time, rank 0 writes it into the current safetensors shard and frees it,
so a 70B export never holds the whole model anywhere.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from dude_dist.adapters import get_dude_layers, inject_and_init, load_dude_state_dict
from dude_dist.config import RunConfig, batch_layout
from dude_dist.dude import DudeLinear
from dude_dist.models import load_model
from dude_dist.sharded_init import Comm, cache_key
from dude_dist.zero import build_ds_config, gathered, model_init_context

logger = logging.getLogger(__name__)

DUDE_PARAMS_FILE = "dude_params.safetensors"


def save_dude_params(model: nn.Module, path: Path, rank: int) -> None:
    """Gather the (small) DuDe tensors and write them, as safetensors, from rank 0. Collective."""
    from safetensors.torch import save_file

    layers = get_dude_layers(model)
    params = [getattr(layer, p) for layer in layers.values() for p in layer.adapter_params()]
    with gathered(params, modifier_rank=None):
        if rank == 0:
            tensors = {f"{name}.{p}": getattr(layer, p).detach().float().cpu().contiguous()
                       for name, layer in layers.items() for p in layer.adapter_params()}
            save_file(tensors, str(path))


def linear_names(model: nn.Module) -> list[str]:
    """Names of every Linear (plain or not yet DuDe) — part of the factor-cache key."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def rebuild_model(cfg: RunConfig, checkpoint: str | Path, world_size: int = 1):
    """The trained model: base weights, DuDe injected from the factor cache, trained tensors loaded.

    Under ZeRO-3 with several ranks the base weights are partitions (see :func:`export_merged`).

    Raises:
        FileNotFoundError: the checkpoint has no ``dude_params.safetensors``.
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    params_file = checkpoint / DUDE_PARAMS_FILE
    if not params_file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {DUDE_PARAMS_FILE}; is it a dude_dist checkpoint?")
    ds_config = build_ds_config(cfg, batch_layout(cfg.train, world_size))
    if world_size == 1:
        ds_config["zero_optimization"]["stage"] = 0
    with model_init_context(ds_config):
        model = load_model(cfg.model)
    key = cache_key(cfg.adapter, cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype, linear_names(model))
    cache_dir = checkpoint.parent.parent / "dude_init"
    if not (cache_dir / "key.json").is_file():
        logger.warning("no factor cache at %s: factorising again (same result, slower)", cache_dir)
    inject_and_init(model, cfg.adapter, comm=Comm(), cache_dir=cache_dir, cache_key=key)
    load_dude_state_dict(model, {k: v for k, v in load_file(str(params_file)).items()})
    return model


def _parameter_groups(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """Export units: each decoder layer whole, and every other module's own parameters."""
    stacks = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")]
    prefixes = [f"{stacks[0]}.{i}" for i in range(len(model.get_submodule(stacks[0])))] if stacks else []
    groups = [(prefix, model.get_submodule(prefix), True) for prefix in prefixes]
    for name, module in model.named_modules():
        inside = any(name == p or name.startswith(p + ".") for p in prefixes)
        if not inside and any(True for _ in module.parameters(recurse=False)):
            groups.append((name, module, False))
    return groups


@torch.no_grad()
def iter_merged_groups(model: nn.Module, collect: bool):
    """Yield, one parameter group at a time, ``{state-dict key: merged CPU tensor}``.

    Every rank must iterate (gathering is collective); ranks with ``collect=False`` get
    empty dicts. DuDe layers come out as plain ``weight`` (= ``W'``) and ``bias``.
    """
    seen: set[int] = set()  # a tied tensor (lm_head = embed_tokens) comes out once, as HF saves it
    for prefix, module, recurse in _parameter_groups(model):
        # The same list on every rank: gathering is collective.
        named = [(n, p) for n, p in module.named_parameters(recurse=recurse) if id(p) not in seen]
        seen.update(id(p) for _, p in named)
        group: dict[str, torch.Tensor] = {}
        with gathered([p for _, p in named], modifier_rank=None):
            if collect:
                dude = {n: m for n, m in module.named_modules() if isinstance(m, DudeLinear)}
                for pname, param in named:
                    owner, _, leaf = pname.rpartition(".")
                    full = f"{prefix}.{pname}" if prefix else pname
                    if owner in dude:
                        if leaf in ("lora_a", "lora_b", "magnitude"):
                            continue
                        tensor = dude[owner].merged_weight() if leaf == "weight" else param.detach()
                    else:
                        tensor = param.detach()
                    group[full] = tensor.to("cpu", copy=True).contiguous()
        yield group


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (no DuDe, no ZeRO) copy of ``model`` with ``W'`` folded in, on every rank.

    For evaluating small models under ZeRO-3: generation then runs without a parameter
    gather per token. Collective; the caller checks that the model fits in memory.
    """
    from transformers import AutoModelForCausalLM

    state: dict[str, torch.Tensor] = {}
    for group in iter_merged_groups(model, collect=True):
        state.update(group)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"merged copy lacks {missing[:5]}")
    for name, buf in plain.named_buffers():
        if buf.is_meta:  # non-persistent buffers (rotary inv_freq): take the original's
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, model.get_buffer(name).detach().cpu().clone(),
                                                       persistent=False)
    return plain.eval()


@torch.no_grad()
def export_merged(model: nn.Module, tokenizer, out_dir: str | Path, rank: int,
                  max_shard_bytes: int = 4 * 1024**3) -> Path:
    """Write ``model`` as a plain Hugging Face folder (safetensors shards, config, tokenizer).

    Every rank must call this (gathering is collective). Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    written: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard and rank == 0:
            name = f"model-{len(written) + 1:05d}.safetensors.tmp"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            written.append(name)
            for key in shard:
                weight_map[key] = name
        shard, shard_bytes = {}, 0

    for group in iter_merged_groups(model, collect=rank == 0):
        shard.update(group)
        shard_bytes += sum(t.numel() * t.element_size() for t in group.values())
        if shard_bytes >= max_shard_bytes:
            flush()
    flush()
    if rank == 0:
        total = len(written)
        final = {}
        for i, tmp in enumerate(written):
            name = f"model-{i + 1:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
            os.replace(out_dir / tmp, out_dir / name)
            final[tmp] = name
        if total > 1:
            index = {"metadata": {}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config = model.config
        config.use_cache = True
        config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        logger.info("exported a plain Hugging Face model to %s (%d shard(s))", out_dir, total)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir
