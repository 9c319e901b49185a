"""Rank-aware sharded initialisation of DuDe layers.

Every rank runs the same steps over the same deterministic plan:

1. **Plan**: each target layer gets an owner rank by longest-processing-time greedy on
   its SVD cost.
2. **Gather to the owner only**: under ZeRO-3 every rank holds a flat 1/P shard of
   ``W0``; the owner alone receives the whole matrix (``gather``, not ``all_gather``).
3. **Factor** on the owner, in float32. Layers go in rounds, one per rank, so every rank
   factorises at the same time (:meth:`InitPlan.rounds`).
4. **Broadcast factors**: ``A0 [r, in]``, ``B0 [out, r]`` - that is ``r * (in + out)``
   numbers instead of the ``out * in`` of the residual. Every rank then subtracts
   ``B0 A0`` from *its own shard* of ``W0``, which is the same residual as broadcasting
   ``W0 - B0 A0`` would give, and ``m0`` follows from one all-reduce of ``out`` numbers.
5. **Cache** the factors (safetensors) so a restart or a resume does no SVD at all.

Without ZeRO-3 a "shard" is the whole weight; with one process there is no
communication; the code path is the same. Collectives go through :mod:`dude_dist.comm`,
which runs them on the process group's device (NCCL: the rank's GPU), whether a shard
lives there or in host memory (``offload_param: cpu``).

The magnitude ``m0`` is the row norm of the *stored* ``W_f + B A``: with a bf16 model the
factors and the residual are rounded when they are stored, and a magnitude computed from
the float32 factors would make the step-0 output differ from the base model's by up to
~5e-3 per row. With ZeRO++ hierarchical partitioning (``zero_hpz_partition_size``) the
node-local secondary copy of each edited weight is rebuilt from the edited primary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dude_dist import comm as comm_lib
from dude_dist.adapters import find_targets, inject_dude, set_trainable_params
from dude_dist.comm import Comm
from dude_dist.config import DudeConfig
from dude_dist.dude import DudeLinear
from dude_dist.svd_init import factorize, measure_svd_gflops, svd_cost
from dude_dist.zero import refresh_secondary_partition

logger = logging.getLogger(__name__)

CACHE_FILE = "factors.safetensors"
CACHE_KEY_FILE = "key.json"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class InitPlan:
    """Which rank factorises which layer.

    Attributes:
        owners: layer name -> owner rank.
        cost: layer name -> estimated flops.
        load: per-rank sum of estimated flops.
    """

    owners: dict[str, int]
    cost: dict[str, float]
    load: list[float]

    def layers_of(self, rank: int) -> list[str]:
        return [name for name, owner in self.owners.items() if owner == rank]

    def rounds(self) -> list[list[str]]:
        """Round ``k`` holds the ``k``-th most costly layer of each rank (rank order).

        Ranks factorise one layer each per round, all at once; under LPT the layers of a
        round have similar costs, so little time is lost waiting at its broadcasts.
        """
        order = {name: i for i, name in enumerate(self.owners)}
        per_rank = [sorted(self.layers_of(r), key=lambda n: (-self.cost[n], order[n])) for r in range(len(self.load))]
        depth = max((len(names) for names in per_rank), default=0)
        return [[names[k] for names in per_rank if k < len(names)] for k in range(depth)]


def plan_init(shapes: dict[str, tuple[int, int]], world_size: int, cfg: DudeConfig) -> InitPlan:
    """Assign layers to ranks by longest-processing-time greedy; identical on every rank.

    Args:
        shapes: layer name -> ``(out, in)``, in model order.
        world_size: number of ranks.
        cfg: adapter config (rank and SVD method set the cost).
    """
    cost = {
        name: svd_cost(out_f, in_f, cfg.rank, cfg.svd, oversample=cfg.svd_oversample, niter=cfg.svd_niter)
        for name, (out_f, in_f) in shapes.items()
    }
    order = list(shapes)
    # Largest first; equal costs keep model order, so the plan never depends on dict luck.
    ranked = sorted(order, key=lambda n: (-cost[n], order.index(n)))
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    for name in ranked:
        owner = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += cost[name]
    return InitPlan(owners={n: owners[n] for n in order}, cost=cost, load=load)


# --------------------------------------------------------------------------- weight shards


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor") and param.ds_tensor is not None


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of a parameter, whether it is a ZeRO-3 partition or a plain tensor."""
    return tuple(getattr(param, "ds_shape", param.shape))


def local_shard(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's slice of the flattened weight, as a writable view, and its start index.

    A ZeRO-3 partition is padded at the end of the last rank; the view excludes padding.
    """
    if not _is_partitioned(param):
        return param.data.view(-1), 0
    part = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start = part * rank
    count = max(0, min(part, param.ds_numel - start))
    return param.ds_tensor.data.view(-1)[:count], start


def gather_to_owner(param: torch.Tensor, owner: int, comm: Comm) -> torch.Tensor | None:
    """The full weight on ``owner`` (None elsewhere); only the owner allocates it.

    The gather runs on the process group's device; the owner factorises it there.
    """
    if not _is_partitioned(param):
        return param.data if comm.rank == owner else None
    gathered = comm.gather(param.ds_tensor.data.view(-1), owner, group=param.ds_process_group)
    if gathered is None:
        return None
    return torch.cat(gathered)[: param.ds_numel].view(full_shape(param))


@torch.no_grad()
def subtract_low_rank(shard: torch.Tensor, start: int, in_features: int,
                      lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """``shard -= (B A)`` restricted to the flat index range ``[start, start + len(shard))``.

    Only the rows that the range touches are formed, so the cost is that of the shard.
    The product is formed where the shard lives (host memory for ``offload_param: cpu``).
    """
    if shard.numel() == 0:
        return
    block = _low_rank_block(shard, start, in_features, lora_a, lora_b)
    shard.copy_(shard.float() - block)


def _low_rank_block(shard: torch.Tensor, start: int, in_features: int,
                    lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``(B A)`` in float32 over the flat index range of ``shard``, on the shard's device."""
    end = start + shard.numel()
    row0, row1 = start // in_features, (end - 1) // in_features + 1
    lora_a = lora_a.to(device=shard.device, dtype=torch.float32)
    lora_b = lora_b[row0:row1].to(device=shard.device, dtype=torch.float32)
    offset = start - row0 * in_features
    return (lora_b @ lora_a).view(-1)[offset : offset + shard.numel()]


@torch.no_grad()
def shard_row_sq_norm(shard: torch.Tensor, start: int, out_features: int, in_features: int) -> torch.Tensor:
    """Partial squared row norms ``[out]`` from one flat shard (sum over ranks gives the full ones)."""
    cdtype = torch.promote_types(shard.dtype, torch.float32)
    sums = torch.zeros(out_features, dtype=cdtype, device=shard.device)
    if shard.numel():
        rows = torch.arange(start, start + shard.numel(), device=shard.device) // in_features
        sums.index_add_(0, rows, shard.to(cdtype).pow(2))
    return sums


@torch.no_grad()
def shard_row_norms(shard: torch.Tensor, start: int, out_features: int, in_features: int,
                    lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Partial squared row norms of ``W_f`` and of ``W_f + B A`` from one flat shard of the
    stored ``W_f``, as ``[2, out]`` (sum over ranks gives the full ones).

    ``lora_a``/``lora_b`` are the stored (possibly bf16-rounded) factors, so the second row
    is the squared norm the layer computes in its forward at step 0.
    """
    cdtype = torch.promote_types(shard.dtype, torch.float32)
    sums = torch.zeros(2, out_features, dtype=cdtype, device=shard.device)
    if shard.numel():
        rows = torch.arange(start, start + shard.numel(), device=shard.device) // in_features
        residual = shard.to(cdtype)
        sums[0].index_add_(0, rows, residual.pow(2))
        full = residual + _low_rank_block(shard, start, in_features, lora_a, lora_b).to(cdtype)
        sums[1].index_add_(0, rows, full.pow(2))
    return sums


# --------------------------------------------------------------------------- cache


def cache_key(cfg: DudeConfig, model_name: str, revision: str | None, dtype: str, names: list[str]) -> dict:
    """Everything the cached factors depend on."""
    return {
        "model": model_name,
        "revision": revision,
        "dtype": dtype,
        "targets": list(cfg.targets),
        "layers_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "rank": cfg.rank,
        "variant": cfg.variant,
        "svd": cfg.svd,
        "svd_oversample": cfg.svd_oversample if cfg.svd == "randomized" else None,
        "svd_niter": cfg.svd_niter if cfg.svd == "randomized" else None,
        "seed": cfg.seed,
    }


def load_cached_factors(cache_dir: Path, key: dict) -> dict[str, torch.Tensor] | None:
    """The cached factors if ``key`` matches the stored one; None (with a log line saying why) if not."""
    key_path, data_path = cache_dir / CACHE_KEY_FILE, cache_dir / CACHE_FILE
    if not key_path.is_file() or not data_path.is_file():
        return None
    stored = json.loads(key_path.read_text())
    if stored != key:
        diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        logger.warning("factor cache %s is stale (differs in: %s); recomputing", cache_dir, ", ".join(diff))
        return None
    return load_file(str(data_path))


def save_cached_factors(cache_dir: Path, key: dict, tensors: dict[str, torch.Tensor]) -> bool:
    """Write factors, then the key, each by an atomic rename: a half-written cache is never read.

    The cache only saves a restart its SVDs, so a write that fails (a full disk) is a
    warning naming the path and the reason, the temporary file is removed, and the run goes
    on. Returns whether the cache was written.
    """
    tmp = cache_dir / (CACHE_FILE + f".tmp{os.getpid()}")
    tmp_key = cache_dir / (CACHE_KEY_FILE + f".tmp{os.getpid()}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, cache_dir / CACHE_FILE)
        tmp_key.write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(tmp_key, cache_dir / CACHE_KEY_FILE)
    except (OSError, SafetensorError) as exc:
        for leftover in (tmp, tmp_key):
            leftover.unlink(missing_ok=True)
        logger.warning("could not write the factor cache %s (%s); training goes on, and a restart will factorise "
                       "again", cache_dir, exc)
        return False
    return True


# --------------------------------------------------------------------------- init


@dataclass
class InitStats:
    """What one initialisation did (logged, and written to TensorBoard as ``init/*``)."""

    layers: int = 0
    svd_count: int = 0
    svd_seconds_per_rank: list[float] = field(default_factory=list)
    layers_per_rank: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    bytes_broadcast: int = 0
    bytes_residual_broadcast: int = 0
    bytes_gathered: int = 0
    energy: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False
    est_seconds_per_rank: list[float] = field(default_factory=list)
    trainable_params: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        """The ``init/*`` TensorBoard scalars."""
        return {
            "init/wall_seconds": self.wall_seconds, "init/svd_count": self.svd_count,
            "init/bytes_broadcast": self.bytes_broadcast, "init/bytes_residual_broadcast": self.bytes_residual_broadcast,
            "init/bytes_gathered": self.bytes_gathered,
            "init/energy_mean": (sum(self.energy.values()) / len(self.energy)) if self.energy else 0.0,
            "init/trainable_params": self.trainable_params,
            **{f"init/svd_seconds_rank{r}": s for r, s in enumerate(self.svd_seconds_per_rank)},
        }


@torch.no_grad()
def init_dude_layers(
    layers: dict[str, DudeLinear],
    cfg: DudeConfig,
    *,
    comm: Comm | None = None,
    cache_dir: str | Path | None = None,
    cache_key: dict | None = None,
) -> InitStats:
    """Initialise uninitialised ``DudeLinear`` layers whose ``weight`` still holds ``W0``.

    Args:
        layers: name -> layer, in model order (identical on every rank).
        cfg: adapter config.
        comm: collectives; None = one process.
        cache_dir: factor cache folder; with a matching ``cache_key`` no SVD runs.
        cache_key: see :func:`cache_key`.

    Returns:
        What was done, with the same figures on every rank.
    """
    comm = comm or Comm()
    t0 = time.perf_counter()
    stats = InitStats(layers=len(layers))
    cache_path = Path(cache_dir) if cache_dir is not None else None
    cached = None
    if cache_path is not None and cache_key is not None:
        cached = load_cached_factors(cache_path, cache_key)
    # Every rank must agree on whether to factorise; the cache file may be on a node-local disk.
    (hits,) = comm_lib.sum_floats([1.0 if cached is not None else 0.0])
    use_cache = int(hits) == comm.world_size
    stats.from_cache = use_cache

    shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
    plan = plan_init(shapes, comm.world_size, cfg)
    if not use_cache and layers:
        first = next(iter(layers.values()))
        device = svd_device(first)
        gflops = measure_svd_gflops(cfg.rank, cfg.svd, oversample=cfg.svd_oversample, niter=cfg.svd_niter,
                                    device=device, size=1024, dtype=first.weight.dtype)
        stats.est_seconds_per_rank = [load / (gflops * 1e9) for load in plan.load]
        logger.info("init plan over %d ranks (SVD %s on %s, ~%.1f Gflop/s measured there): %s", comm.world_size,
                    cfg.svd, device, gflops,
                    "; ".join(f"rank {r}: {len(plan.layers_of(r))} layers, {plan.load[r] / 1e9:.3g} Gflop, "
                              f"~{s:.2f} s" for r, s in enumerate(stats.est_seconds_per_rank)))
    svd_seconds = 0.0
    factors: dict[str, torch.Tensor] = {}
    broadcast_start = comm.bytes_broadcast

    def finish(name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Every rank: the layer's factors, its residual shard, and the norms of what is stored."""
        layer = layers[name]
        set_layer_factors(layer, lora_a, lora_b, comm)
        factors[f"{name}.lora_a"], factors[f"{name}.lora_b"] = lora_a, lora_b
        factors[f"{name}.magnitude"] = layer.magnitude.detach().float()
        out_f, in_f = shapes[name]
        stats.bytes_residual_broadcast += out_f * in_f * layer.weight.element_size()
        done = len(factors) // 3
        if done % 16 == 0 or done == len(layers):
            logger.info("init: %d/%d layers done (%.1f s)", done, len(layers), time.perf_counter() - t0)

    if use_cache:
        for name, layer in layers.items():
            device = layer.lora_a.device
            finish(name, *(cached[f"{name}.{key}"].to(device=device, dtype=torch.float32)
                           for key in ("lora_a", "lora_b")))
    else:
        # Rounds: round k holds the k-th layer of every rank, so all ranks factorise at the
        # same time; only the cheap gathers and broadcasts are one layer after another.
        for names in plan.rounds():
            full: dict[str, torch.Tensor] = {}
            for name in names:
                weight = gather_to_owner(layers[name].weight, plan.owners[name], comm)
                if weight is not None:
                    full[name] = weight
            mine: dict[str, tuple[torch.Tensor, ...]] = {}
            for name, weight in full.items():
                t = time.perf_counter()
                fac = factorize(weight, cfg.rank, variant=cfg.variant, method=cfg.svd, name=name,
                                seed=cfg.seed, oversample=cfg.svd_oversample, niter=cfg.svd_niter)
                mine[name] = (fac.lora_a, fac.lora_b)
                svd_seconds += time.perf_counter() - t
                stats.svd_count += 1
                stats.energy[name] = fac.energy
            del full
            for name in names:
                out_f, in_f = shapes[name]
                device = comm_lib.comm_device() if comm.active else layers[name].lora_a.device
                owned = mine.pop(name, None)
                parts = [torch.empty(cfg.rank, in_f, device=device, dtype=torch.float32),
                         torch.empty(out_f, cfg.rank, device=device, dtype=torch.float32)]
                for part, value in zip(parts, owned or (None,) * 2):
                    if value is not None:
                        part.copy_(value)
                    comm.broadcast(part, plan.owners[name])
                finish(name, *parts)

    stats.bytes_broadcast = comm.bytes_broadcast - broadcast_start
    stats.bytes_gathered = comm.bytes_gathered
    per_rank = comm.all_gather_floats([svd_seconds, float(stats.svd_count)])
    stats.svd_seconds_per_rank = [r[0] for r in per_rank]
    stats.layers_per_rank = [int(r[1]) for r in per_rank]
    stats.svd_count = sum(stats.layers_per_rank)
    stats.energy = _gather_energy(stats.energy, comm)
    if not use_cache and cache_path is not None and cache_key is not None and comm.rank == 0:
        save_cached_factors(cache_path, cache_key, factors)
    comm.barrier()
    stats.wall_seconds = time.perf_counter() - t0
    logger.info(
        "init: %d layers, %d SVDs%s, %.2f s wall; broadcast %.3g MB (a residual broadcast: %.3g MB)",
        stats.layers, stats.svd_count, " (factor cache hit)" if use_cache else "", stats.wall_seconds,
        stats.bytes_broadcast / 1e6, stats.bytes_residual_broadcast / 1e6,
    )
    return stats


@torch.no_grad()
def set_layer_factors(layer: DudeLinear, lora_a: torch.Tensor, lora_b: torch.Tensor, comm: Comm) -> None:
    """Store ``A0, B0`` in ``layer`` (rounded to its dtype), subtract the stored ``B0 A0`` from
    this rank's shard of ``W0``, and set ``||W_f||^2`` and ``m0`` from what is stored.

    Every rank calls this for every layer (one all-reduce of ``[2, out]`` numbers when the
    weight is partitioned).
    """
    layer.lora_a.data.copy_(lora_a)
    layer.lora_b.data.copy_(lora_b)
    stored_a, stored_b = layer.lora_a.detach(), layer.lora_b.detach()
    shard, start = local_shard(layer.weight)
    subtract_low_rank(shard, start, layer.in_features, stored_a, stored_b)
    sq = shard_row_norms(shard, start, layer.out_features, layer.in_features, stored_a, stored_b)
    if _is_partitioned(layer.weight):
        comm.all_reduce_sum(sq)
        refresh_secondary_partition(layer.weight)
    layer.weight_sq_norm.copy_(sq[0])
    layer.magnitude.data.copy_(sq[1].clamp_min(layer.eps).sqrt())


def svd_device(layer: DudeLinear) -> torch.device:
    """Where the owner of ``layer`` will factorise it: the gathered weight's device."""
    if _is_partitioned(layer.weight):
        return comm_lib.comm_device() if comm_lib.is_active() else layer.weight.ds_tensor.device
    return layer.weight.device


def _gather_energy(energy: dict[str, float], comm: Comm) -> dict[str, float]:
    merged: dict[str, float] = {}
    for part in comm.all_gather_object(energy):
        merged.update(part)
    return merged


# --------------------------------------------------------------------------- models


def apply_dude(model: nn.Module, cfg: DudeConfig, *, comm=None, cache_dir=None, cache_key=None) -> nn.Module:
    """Replace the target Linears of ``model`` with initialised ``DudeLinear`` layers.

    On a plain model this factorises every target in this process. With ``comm`` (a
    :class:`dude_dist.comm.Comm`), the factorisations are shared out over ranks
    and the weights may be ZeRO-3 partitions; see :mod:`dude_dist.sharded_init`.

    Args:
        model: a Hugging Face causal LM (or any module with ``nn.Linear`` targets).
        cfg: the adapter section of the run config.
        comm: process group wrapper; None = this process only.
        cache_dir: where factors are saved and reloaded (no SVD when the key matches).
        cache_key: what the cache must match (model, revision, targets, rank, ...).

    Returns:
        ``model``, changed in place; only DuDe parameters require grad.
    """
    inject_and_init(model, cfg, comm=comm, cache_dir=cache_dir, cache_key=cache_key)
    return model


def inject_and_init(model: nn.Module, cfg: DudeConfig, *, comm=None, cache_dir=None, cache_key=None):
    """:func:`apply_dude`, returning what the initialisation did (an ``InitStats``)."""
    layers = inject_dude(model, cfg, find_targets(model, cfg))
    stats = init_dude_layers(layers, cfg, comm=comm, cache_dir=cache_dir, cache_key=cache_key)
    stats.trainable_params = set_trainable_params(model)
    logger.info("DuDe on %d layers (rank %d, variant %s): %d trainable parameters",
                len(layers), cfg.rank, cfg.variant, stats.trainable_params)
    return stats
