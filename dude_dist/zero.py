"""DeepSpeed's engine for dude_dist: comm start-up, the engine config, ZeRO-3 model
construction, the DuDe parameters kept whole, and parameter gathering.

Besides this module, :mod:`dude_dist.checkpoint` calls the engine's save/load and
:mod:`dude_dist.export` gathers through :func:`gathered`; the core (``dude.py``,
``svd_init.py``, ``adapters.py``) never imports DeepSpeed."""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from dude_dist.config import BatchLayout, RunConfig, TrainConfig
from dude_dist.errors import ConfigError, read_json

logger = logging.getLogger(__name__)


def init_deepspeed_comm(backend: str, timeout: timedelta, rank: int, world_size: int) -> None:
    """``deepspeed.init_distributed`` without the CPU shared-memory op build.

    On a CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at start-up
    (about a minute on 2 cores) that gloo does not need; it is skipped here. GPUs are not
    affected.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # `import deepspeed.comm.torch as m` would bind the `torch` attribute of
        # deepspeed.comm (the torch package itself), so fetch the module by name.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                               rank=rank, world_size=world_size, verbose=False)


def _deep_update(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def single_gpu_zero3_hint(ds_config: dict, world_size: int, device_type: str) -> str | None:
    """A line of advice for ZeRO-3 on a single GPU without parameter offload, else None
    (``ds_config``: :func:`build_ds_config`'s, a ``deepspeed.config_file`` merged in).

    One rank partitions nothing, yet DeepSpeed still fetches every parameter in each forward
    and backward, with a stream synchronisation per parameter (``NoGatherHandle.wait``: 1827
    of the 2340 host syncs of 6 bf16 steps on an H200). Stage 2 partitions no parameter, so
    it fetches none, and takes the same steps (``tests/distributed/test_training.py``).
    """
    zero = ds_config.get("zero_optimization", {})
    offload = zero.get("offload_param", {}).get("device", "none")
    if world_size != 1 or device_type != "cuda" or zero.get("stage", 0) != 3 or offload not in ("none", None):
        return None
    return ("deepspeed.zero_stage=3 on one GPU partitions nothing but still fetches every parameter with a stream "
            "synchronisation in each forward and backward; when the model fits on the GPU, deepspeed.zero_stage=2 "
            "takes the same steps without them (deepspeed.offload_param=cpu is what needs stage 3 on one GPU)")


def build_ds_config(cfg: RunConfig, layout: BatchLayout) -> dict:
    """The DeepSpeed config, built from the run config (a JSON file may override keys).

    Batch sizes always come from :func:`dude_dist.config.batch_layout`; a JSON override
    that disagrees with them is an error, not a silent second source of truth.
    """
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        if ds.offload_param != "none":
            zero["offload_param"] = {"device": ds.offload_param, "pin_memory": torch.cuda.is_available()}
        if ds.hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = ds.hpz_partition_size
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        # The optimizer is torch's AdamW, which DeepSpeed refuses with an offloaded optimizer
        # unless told otherwise; on the host it updates the few DuDe parameters (34M at 70B,
        # r=16) in well under a second, with no C++ op to build.
        config["zero_force_ds_cpu_optimizer"] = False
    if cfg.model.dtype in ("bfloat16", "float16"):
        # DuDe gradients are tiny (<= 34M numbers): accumulating and reducing them in fp32
        # costs little and keeps the rounding of bf16 out of the update.
        config["communication_data_type"] = "fp32"
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file {ds.config_file!r} does not exist"
                              + (" (it is a folder)" if path.is_dir() else ""))
        user = read_json(path, ConfigError, f"deepspeed.config_file {ds.config_file}")
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed.config_file {ds.config_file}: expected a JSON object of DeepSpeed keys, "
                              f"got a {type(user).__name__}")
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ConfigError(f"deepspeed.config_file {ds.config_file}: '{key}' is set by dude_dist "
                                  "(torch AdamW + cosine); remove it")
        merged = _deep_update(copy.deepcopy(config), user)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if merged[key] != config[key]:
                raise ConfigError(
                    f"deepspeed.config_file {ds.config_file}: {key}={merged[key]} disagrees with the run config "
                    f"({config[key]}); set batch sizes under train: instead"
                )
        config = merged
    return config


@contextlib.contextmanager
def model_init_context(ds_config: dict):
    """Build a model so that, under ZeRO-3, no rank ever holds all of its weights.

    Yields the ``HfDeepSpeedConfig`` object; it must stay referenced while
    ``from_pretrained`` runs (transformers reads it through a weak reference).
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield None
        return
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    yield hf_ds_config


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Full values of (possibly ZeRO-3 partitioned) parameters inside the block.

    With ``modifier_rank`` set, edits made on that rank are re-partitioned on exit;
    with None they are discarded.
    """
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def refresh_secondary_partition(param: torch.Tensor) -> None:
    """Rebuild a ZeRO++ hpZ secondary (node-local) partition from the edited primary one.

    ``zero.Init`` copies each weight into ``ds_secondary_tensor`` when it partitions it; the
    init then edits only the primary partition (``ds_tensor``), so the secondary copy, which
    later forward passes gather from, would keep ``W0``. Dropping it and gathering the
    parameter once from the primary partitions makes DeepSpeed write a new secondary copy
    when it releases the parameter. A no-op without hpZ.
    """
    if getattr(param, "ds_secondary_tensor", None) is None:
        return
    import deepspeed

    param.ds_secondary_tensor = None
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        pass  # on exit DeepSpeed partitions the gathered values again, secondary copy included


def keep_whole(engine, params: list[nn.Parameter]) -> int:
    """Keep ``params`` whole on every rank under ZeRO-3, whatever their size.

    ZeRO-3 leaves a parameter unpartitioned only below ``stage3_param_persistence_threshold``
    (100k elements by default); a 70B ``q_proj``'s ``lora_a`` has 131k, so each layer would
    pay latency-bound gathers for a few hundred kB in every forward, recompute and backward.
    Marked persistent, they are gathered once now and after each optimizer step (DeepSpeed
    re-gathers its persistent parameters then), while their gradients and Adam states stay
    partitioned. Returns how many parameters this changed (0 without ZeRO-3).
    """
    optimizer = getattr(engine, "optimizer", None)
    persistent = getattr(optimizer, "persistent_parameters", None)
    if persistent is None:
        return 0
    extra = [p for p in params if hasattr(p, "ds_persist") and not p.ds_persist]
    for param in extra:
        param.ds_persist = True
    if extra:
        persistent.extend(extra)
        extra[0].all_gather(param_list=extra)
    return len(extra)


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (ZeRO, bf16), or the engine's own."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _sharded(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _full_value(engine, param, key: str | None) -> torch.Tensor | None:
    """The full fp32 master (``key`` None) or Adam moment of ``param``, on every rank. Collective
    under ZeRO (every rank calls it for the same parameter, in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _sharded(param):
        return safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if key is None:
        return param.detach().float()
    return _base_optimizer(engine).state.get(param, {}).get(key)


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors torch's optimizer steps: DeepSpeed's flat fp32 partitions (ZeRO-3 keeps
    them out of ``param_groups`` between steps; ZeRO-1/2 and the bf16 optimizer name them
    differently), or the parameters themselves without ZeRO."""
    wrapper = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flat = getattr(wrapper, attr, None)
        if flat:
            return list(flat)
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


def adam_step_count(engine) -> int:
    """Optimizer steps Adam has applied (its bias correction); the same in every parameter group."""
    steps = [float(state["step"]) for state in _base_optimizer(engine).state.values() if "step" in state]
    return int(max(steps, default=0))


def gather_trainable_state(engine, named: dict[str, nn.Parameter], keep: bool) -> dict[str, torch.Tensor]:
    """Full fp32 masters and Adam moments of ``named`` as ``{name, name.exp_avg, name.exp_avg_sq}``.

    Each tensor is assembled from the ZeRO partitions one parameter at a time (collective:
    every rank calls this); only a rank with ``keep`` holds the result, in host memory (about
    0.4 GB at 70B, r=16). A parameter that has not taken an optimizer step yet has zero moments.
    """
    out: dict[str, torch.Tensor] = {}
    for name, param in named.items():
        master = _full_value(engine, param, None)
        moments = {key: _full_value(engine, param, key) for key in ADAM_KEYS}
        if keep:
            shape = tuple(getattr(param, "ds_shape", param.shape))
            out[name] = master.detach().float().reshape(shape).cpu()
            for key, value in moments.items():
                out[f"{name}.{key}"] = (torch.zeros(shape) if value is None
                                        else value.detach().float().reshape(shape).cpu())
    return out


def _set_zero3_partition(param, full: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``full`` into the fp32 master (``key`` None) or Adam moment
    partition of a ZeRO-3 parameter. DeepSpeed's own full-tensor setter cannot fill the
    padded tail of the last partition when the size does not divide by the world size."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    part = param.ds_tensor.numel()
    start = param._z3_optimizer._get_param_partition_rank(param) * part
    flat = full.detach().reshape(-1).float()
    local = torch.zeros(part, dtype=torch.float32)
    piece = flat[start : start + part]
    local[: piece.numel()] = piece
    if key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, key)


@torch.no_grad()
def load_trainable_state(engine, named: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor],
                         adam_step: int) -> None:
    """Put full fp32 masters and Adam moments into this run's partitions, whatever world size
    wrote them, and refresh the model's own (bf16) copies from the masters. Every rank calls
    this with the same ``tensors``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _base_optimizer(engine)
    for p in _optimizer_tensors(engine):  # torch's Adam creates its state lazily, at the first step
        state = base.state[p]
        state["step"] = torch.tensor(float(adam_step))
        for key in ADAM_KEYS:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    for name, param in named.items():
        master = tensors[name]
        if hasattr(param, "ds_id"):
            _set_zero3_partition(param, master, None)
            for key in ADAM_KEYS:
                _set_zero3_partition(param, tensors[f"{name}.{key}"], key)
        elif _sharded(param):
            safe_set_full_fp32_param(param, master)
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(param, tensors[f"{name}.{key}"], key)
        else:
            param.copy_(master)
            for key in ADAM_KEYS:
                base.state[param][key].copy_(tensors[f"{name}.{key}"])
    params = list(named.values())
    with gathered(params, modifier_rank=0):
        for name, param in named.items():
            if _sharded(param):
                param.data.copy_(tensors[name].reshape(param.shape).to(param.dtype))


def initialize_engine(model: nn.Module, train: TrainConfig, total_steps: int, ds_config: dict):
    """Activation checkpointing (``train.gradient_checkpointing``, non-reentrant), a torch AdamW
    over the trainable parameters (no CPU FusedAdam build) with linear warm-up and cosine decay
    over ``total_steps``, ``deepspeed.initialize``, and the DuDe parameters kept whole under
    ZeRO-3 (:func:`keep_whole`). Returns the engine."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    if train.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(train.warmup_ratio * total_steps), total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=params, config=ds_config)
    kept = keep_whole(engine, params)
    if kept:
        logger.info("ZeRO-3: %d DuDe parameters above the persistence threshold kept whole on every rank", kept)
    return engine
