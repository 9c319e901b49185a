"""Rebuild a trained DuDe model from (base weights + factor cache + trainable tensors), and
export it as a plain Hugging Face folder with ``W'`` folded into ordinary Linear weights.

Under ZeRO-3 (``deepspeed --num_gpus N launch/export.py ...``) every rank holds a 1/N
shard of the base model; the export gathers one parameter group (a decoder layer's
parameters) at a time, rank 0 writes it into the current safetensors shard and frees it,
so a 70B export never holds the whole model anywhere.

The model is rebuilt with the checkpoint's own adapter settings (its ``meta.json``); a
config that disagrees on a key that changes the weights is refused, as a resume is. The
run's factor cache (``<output_dir>/dude_init``) is read, never written: a factorisation
that must run again goes to a temporary folder. The export is written into a temporary
sibling folder of ``--out`` and renamed into place when complete, with ordinary file
permissions; an existing non-empty ``--out`` is replaced only when asked
(``overwrite``), and never merged into.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dude_dist import comm
from dude_dist.adapters import adapter_parameters, load_dude_state_dict
from dude_dist.checkpoint import (
    META,
    _lookup,
    fingerprint_differences,
    newest_verified,
    read_meta,
    verify_checkpoint,
    write_text_atomic,
)
from dude_dist.config import DudeConfig, RunConfig, batch_layout
from dude_dist.dude import DudeLinear
from dude_dist.errors import CheckpointError, ConfigError
from dude_dist.models import load_model
from dude_dist.run_dir import RunDir
from dude_dist.sharded_init import CACHE_FILE, CACHE_KEY_FILE, Comm, cache_key, inject_and_init
from dude_dist.svd_init import factorize
from dude_dist.zero import build_ds_config, gathered, model_init_context

logger = logging.getLogger(__name__)

DUDE_PARAMS_FILE = "dude_params.safetensors"


ADAPTER_FILE = "adapter.json"


def adapter_description(cfg: RunConfig) -> dict:
    """What the DuDe tensors of a checkpoint are: the base model and the adapter settings."""
    a = cfg.adapter
    return {"model": cfg.model.name_or_path, "revision": cfg.model.revision, "gguf_file": cfg.model.gguf_file,
            "dtype": cfg.model.dtype, "targets": list(a.targets), "rank": a.rank, "variant": a.variant,
            "svd": a.svd, "seed": a.seed, "norm_grad": a.norm_grad,
            "files": {"tensors": DUDE_PARAMS_FILE, "factor_cache": "../../dude_init"}}


def save_dude_params(model: nn.Module, path: Path, rank: int) -> None:
    """Gather the (small) DuDe tensors and write them, as safetensors, from rank 0. Collective."""
    named = adapter_parameters(model)
    with gathered(list(named.values()), modifier_rank=None):
        if rank == 0:
            save_file({key: p.detach().float().cpu().contiguous() for key, p in named.items()}, str(path))


def write_adapter_files(model: nn.Module, directory: Path, cfg: RunConfig, rank: int) -> None:
    """A checkpoint's adapter files: the DuDe tensors as the model holds them (every rank
    takes part) and what they are (rank 0), enough for evaluation and export on any world size."""
    save_dude_params(model, directory / DUDE_PARAMS_FILE, rank)
    if rank == 0:
        write_text_atomic(directory / ADAPTER_FILE, json.dumps(adapter_description(cfg), indent=1))


def linear_names(model: nn.Module) -> list[str]:
    """Names of every Linear (plain or not yet DuDe) — part of the factor-cache key."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# Besides the resume keys, what changes the rebuilt weights (W_f is stored in the model dtype).
REBUILD_KEYS = ("adapter.svd_oversample", "adapter.svd_niter", "model.dtype")


def config_for_checkpoint(cfg: RunConfig, checkpoint: str | Path, meta: dict | None = None) -> RunConfig:
    """``cfg`` with the adapter settings (and model dtype) the checkpoint was trained with.

    Raises:
        ConfigError: ``cfg`` (its YAML or a ``--set``) disagrees with the checkpoint on a
            key that changes the rebuilt weights; the message names each key and both values.
    """
    meta = meta if meta is not None else read_meta(checkpoint)
    saved = meta.get("config") or {}
    now = dataclasses.asdict(cfg)
    differ = fingerprint_differences(meta, cfg)
    for key in REBUILD_KEYS:
        old = _lookup(saved, key)
        if old is not None and old != _lookup(now, key):
            differ.append(f"{key}: checkpoint {old!r} vs config {_lookup(now, key)!r}")
    if differ:
        raise ConfigError(f"checkpoint {checkpoint} was trained with other settings: {'; '.join(differ)}; drop the "
                          "conflicting --set (or YAML change): the checkpoint's own settings rebuild its model")
    adapter = saved.get("adapter")
    if isinstance(adapter, dict):
        known = {f.name for f in dataclasses.fields(DudeConfig)}
        merged = {**dataclasses.asdict(cfg.adapter), **{k: v for k, v in adapter.items() if k in known}}
        cfg = dataclasses.replace(cfg, adapter=DudeConfig(**merged))
    return cfg


def _read_only_cache(cache_dir: Path) -> Path:
    """A private folder whose entries link to the run's factor cache: reads go to the run's
    files, a write (a stale or missing cache) replaces the links, never the run's files."""
    private = Path(tempfile.mkdtemp(prefix="dude_init-"))
    if cache_dir.is_dir():
        for entry in cache_dir.iterdir():
            if entry.is_file():
                (private / entry.name).symlink_to(entry.resolve())
    return private


def resolve_checkpoint(cfg: RunConfig, checkpoint: str | None) -> Path:
    """The checkpoint that ``--checkpoint`` names, verified: ``auto`` (or None) is the newest
    one under ``<output_dir>/checkpoints`` that passes verification (a damaged newer one is
    skipped with a warning naming the file); a folder must pass it itself.

    Raises:
        CheckpointError: none under ``output_dir``, or the named one is missing or damaged.
    """
    root = RunDir(cfg.output_dir).checkpoints
    if checkpoint in (None, "auto"):
        ckpt = newest_verified(root)
        if ckpt is None:
            raise CheckpointError(f"no complete checkpoint under {root} (output_dir={cfg.output_dir!r})")
        return ckpt
    ckpt = Path(checkpoint)
    if not (ckpt / META).is_file():
        raise CheckpointError(f"--checkpoint {checkpoint}: not a complete checkpoint (no {META} there)")
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoint {checkpoint}: {exc}") from None
    return ckpt


def rebuild_model(cfg: RunConfig, checkpoint: str | Path, world_size: int = 1, *, verified: bool = False):
    """The trained model: base weights, DuDe injected from the factor cache, trained tensors loaded.

    The checkpoint is verified first (sizes and checksums; ``verified`` skips the
    checksums when :func:`resolve_checkpoint` has just checked them) and its own adapter
    settings are used (:func:`config_for_checkpoint`). The run's factor cache is only read. Under
    ZeRO-3 with several ranks the base weights are partitions (see :func:`export_merged`).

    Raises:
        CheckpointError: the checkpoint has no ``dude_params.safetensors`` or a damaged file.
        ConfigError: ``cfg`` conflicts with the checkpoint's adapter/model settings.
    """
    checkpoint = Path(checkpoint)
    params_file = checkpoint / DUDE_PARAMS_FILE
    if not params_file.is_file():
        raise CheckpointError(f"{checkpoint} has no {DUDE_PARAMS_FILE}; is it a dude_dist checkpoint?")
    meta = verify_checkpoint(checkpoint, checksums=not verified)
    cfg = config_for_checkpoint(cfg, checkpoint, meta)
    ds_config = build_ds_config(cfg, batch_layout(cfg.train, world_size))
    if world_size == 1:
        ds_config["zero_optimization"]["stage"] = 0
    with model_init_context(ds_config):
        model = load_model(cfg.model)
    key = cache_key(cfg.adapter, cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype, linear_names(model))
    run_cache = RunDir.of_checkpoint(checkpoint).factor_cache
    if not (run_cache / CACHE_KEY_FILE).is_file():
        logger.warning("no factor cache at %s: factorising again (same result, slower)", run_cache)
    private = _read_only_cache(run_cache)
    try:
        inject_and_init(model, cfg.adapter, comm=Comm(), cache_dir=private, cache_key=key)
    finally:
        shutil.rmtree(private, ignore_errors=True)
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


def check_export_target(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that cannot take an export, before any model is built.

    Raises:
        ConfigError: ``out_dir`` is a file, a non-empty folder without ``overwrite``, or
            its parent cannot be written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; give a folder for the exported model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out_dir)!r} is not empty; pass --overwrite to replace it with the new model "
                          "(it is swapped in when complete), or give a new folder")
    parent = out_dir.absolute().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"--out {str(out_dir)!r}: {existing} is not a writable folder")
    return out_dir


def _normal_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as any other program writes them
    (safetensors creates its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Put the finished ``tmp`` at ``out_dir``; an old folder there is moved aside first and
    removed after, so ``out_dir`` never holds a mix of the two."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@torch.no_grad()
def export_merged(model: nn.Module, tokenizer, out_dir: str | Path, rank: int,
                  max_shard_bytes: int = 4 * 1024**3, overwrite: bool = False) -> Path:
    """Write ``model`` as a plain Hugging Face folder (safetensors shards, config, tokenizer).

    Rank 0 writes into a temporary sibling folder and renames it to ``out_dir`` when
    complete (a failed export leaves ``out_dir`` as it was); files get the usual
    permissions. Every rank must call this (gathering is collective). Returns ``out_dir``.

    Raises:
        ConfigError: see :func:`check_export_target`.
    """
    out_dir = check_export_target(out_dir, overwrite) if rank == 0 else Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if rank == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    written: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard and rank == 0:
            name = f"model-{len(written) + 1:05d}.safetensors.tmp"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            written.append(name)
            for key in shard:
                weight_map[key] = name
        shard, shard_bytes = {}, 0

    try:
        for group in iter_merged_groups(model, collect=rank == 0):
            shard.update(group)
            shard_bytes += sum(t.numel() * t.element_size() for t in group.values())
            if shard_bytes >= max_shard_bytes:
                flush()
        flush()
        if rank == 0:
            total = len(written)
            final = {}
            for i, name in enumerate(written):
                final[name] = f"model-{i + 1:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
                os.replace(tmp / name, tmp / final[name])
            if total > 1:
                index = {"metadata": {}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
            config = model.config
            config.use_cache = True
            config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _normal_permissions(tmp)
            _swap_in(tmp, out_dir)
            logger.info("exported a plain Hugging Face model to %s (%d shard(s))", out_dir, total)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier()
    return out_dir


def _initial_factors(cfg: RunConfig, checkpoint: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """``A0, B0`` of every DuDe layer: from the run's factor cache when it was made with these
    settings, else factorised again from the base weights in this process (seeded: the same
    values)."""
    cache = RunDir.of_checkpoint(checkpoint).factor_cache
    want = cache_key(cfg.adapter, cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype, [])
    if (cache / CACHE_KEY_FILE).is_file() and (cache / CACHE_FILE).is_file():
        stored = json.loads((cache / CACHE_KEY_FILE).read_text())
        if all(stored.get(k) == v for k, v in want.items() if k != "layers_sha256"):
            factors = load_file(str(cache / CACHE_FILE))
            if all(f"{n}.lora_a" in factors for n in names):
                return factors
    logger.warning("no matching factor cache at %s: factorising the base weights again in this process", cache)
    model = load_model(cfg.model)
    out = {}
    for name in names:
        weight = model.get_submodule(name).weight
        fac = factorize(weight, cfg.adapter.rank, variant=cfg.adapter.variant, method=cfg.adapter.svd, name=name,
                        seed=cfg.adapter.seed, oversample=cfg.adapter.svd_oversample, niter=cfg.adapter.svd_niter)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = fac.lora_a, fac.lora_b
    return out


def export_peft(cfg: RunConfig, checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a checkpoint as a standard PEFT DoRA adapter on the *original* base weights.

    DuDe is exactly DoRA of rank ``2r``: ``W0 + [B, B0] [A; -A0] = W_f + B A`` (the residual is
    ``W_f = W0 - B0 A0``), with DuDe's magnitude ``m`` as DoRA's and scaling 1
    (``lora_alpha = r = 2 * rank``). ``PeftModel.from_pretrained(base, out_dir)`` then gives the
    trained model with no dude_dist installed; the folder holds ``2 r (in + out) + out``
    numbers per adapted layer (``A0``, ``B0`` come from the run's factor cache). Needs no
    process group: it reads the checkpoint's files only.

    Raises:
        CheckpointError: a damaged checkpoint or one without DuDe tensors.
        ConfigError: ``out_dir`` cannot take the export, or the config conflicts with the
            checkpoint's adapter settings.
    """
    checkpoint = Path(checkpoint)
    out_dir = check_export_target(out_dir, overwrite)
    params_file = checkpoint / DUDE_PARAMS_FILE
    if not params_file.is_file():
        raise CheckpointError(f"{checkpoint} has no {DUDE_PARAMS_FILE}; is it a dude_dist checkpoint?")
    meta = verify_checkpoint(checkpoint)
    cfg = config_for_checkpoint(cfg, checkpoint, meta)
    trained = load_file(str(params_file))
    names = sorted({key.rsplit(".", 1)[0] for key in trained})
    initial = _initial_factors(cfg, checkpoint, names)
    tensors = {}
    for name in names:
        a, b, m = (trained[f"{name}.{p}"].float() for p in ("lora_a", "lora_b", "magnitude"))
        a0, b0 = initial[f"{name}.lora_a"].float(), initial[f"{name}.lora_b"].float()
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([a, -a0]).contiguous()  # [2r, in]
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([b, b0], dim=1).contiguous()  # [out, 2r]
        tensors[f"{prefix}.lora_magnitude_vector"] = m.contiguous()
    rank = 2 * cfg.adapter.rank
    plain = not any(t.startswith("re:") for t in cfg.adapter.targets)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.model.name_or_path,
              "revision": cfg.model.revision, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "use_dora": True,
              "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "target_modules": list(cfg.adapter.targets) if plain else names, "modules_to_save": None,
              "inference_mode": True}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        _normal_permissions(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("PEFT DoRA adapter (r=%d = 2 x %d, %d layers, %.1f MB) written to %s", rank, cfg.adapter.rank,
                len(names), sum(t.numel() * 4 for t in tensors.values()) / 1e6, out_dir)
    return out_dir
