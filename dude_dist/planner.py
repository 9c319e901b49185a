"""Plan a run before it starts: parameters, per-GPU memory under ZeRO-3, and the init plan.

    python launch/plan.py --config configs/qwen32b.yaml --nodes 4 --gpus-per-node 8

The model is built on the ``meta`` device from its ``config.json`` facts (no weights, no
download): a local folder's ``config.json``, or ``configs/models/<org>--<name>.json`` for a
hub id. DuDe shells are injected with :func:`dude_dist.adapters.inject_dude` exactly as a
run does, so the trainable count is that of the real model, not of a formula alone.

Per-GPU memory over ``N = nodes * gpus_per_node`` ranks, ``P`` parameters, ``T`` trainable
ones, ``b`` bytes per element of the model dtype (2 for bf16)::

    params          b * P / N            every parameter's ZeRO-3 partition
    grads           4 * T / N            gradient partition, accumulated in fp32 (bf16 runs ask DeepSpeed
                                         for data_types.grad_accum_dtype fp32; an fp32 model has 4 anyway)
    optimizer      12 * T / N            fp32 master copy + Adam exp_avg + exp_avg_sq
    optimizer_step  0                    the step uses the fp32 gradient partition itself (DeepSpeed's
                                         estimator mode, gradients in the model dtype, adds an fp32 copy
                                         of one sub-group: 4 * min(T / N, S), S = sub_group_size)
    persistent      b * (elements of parameters with <= stage3_param_persistence_threshold
                    elements, and every trainable one): ZeRO-3 keeps these whole on every
                    rank (norms, biases; the trainer keeps every DuDe A, B and m whole,
                    :func:`dude_dist.zero.keep_whole`)
    buffers         non-partitioned buffers (DuDe's fp32 ||W_f||^2 rows, rotary tables)
    gathered        b * G + b * L_t      the weights gathered at once during a step (G elements,
                                         :func:`gathered_elements`: a whole decoder layer plus
                                         the largest module or the prefetch bucket fetched ahead),
                                         and the largest module's full gradient if it is trainable
    in_flight       b * L                a released module's gathered buffer is freed only after the
                                         next module's all-gather has allocated its own (the largest
                                         module L: measured so on the 70B-wide rehearsal)
    buckets         4 * reduce           the gradient reduce bucket (reduce_bucket_size elements),
                                         fp32 (communication_data_type in bf16 runs); the prefetch
                                         bucket is part of ``gathered``
    activations     see :func:`activation_bytes`
    reserve         CUDA context, NCCL buffers and allocator slack (a fixed allowance)

With ``all_trainable=True`` (T = P) the model-state part (params + grads + optimizer +
optimizer_step + gathered) is what DeepSpeed's
``estimate_zero3_model_states_mem_needs(cpu_offload=False)`` estimates as
``4 * L + 18 * P / N``; :func:`deepspeed_estimate` calls it for comparison. DeepSpeed counts
18 bytes per parameter where the accounting above has 16 plus the bounded fp32 step copy.

Step time (:func:`step_estimate`): the model FLOPs of one optimizer step
(:class:`dude_dist.throughput.FlopModel`: forward 2N, input-gradient backward 2N, the DuDe
terms, recompute 2N with checkpointing, attention per sample) over ``global_batch_size *
max_seq_len`` tokens (full rows: what packing gives; padded batches carry fewer real
tokens), divided by ``N * peak * mfu``: the time a stated per-GPU bf16 peak at a stated
MFU needs, and the tokens/s that follow.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dude_dist.adapters import find_targets, inject_dude, set_trainable_params
from dude_dist.config import DTYPES, DudeConfig, RunConfig, batch_layout
from dude_dist.errors import ConfigError, PlanError, read_json
from dude_dist.loss import LOSS_CHUNK_ELEMENTS
from dude_dist.models import resolve_model_path
from dude_dist.sharded_init import plan_init
from dude_dist.svd_init import measure_svd_gflops, svd_cost
from dude_dist.throughput import FlopModel

GIB = 2**30
ADAM_STATE_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq
FP32_GRAD_BYTES = 4
SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16 (dude_dist.throughput.PEAK_TFLOPS)
DEFAULT_MFU = 0.4



# --------------------------------------------------------------------------- model facts


def model_facts_name(name_or_path: str) -> str:
    """File name of a hub id's stored facts: ``Qwen/Qwen2.5-32B`` -> ``Qwen--Qwen2.5-32B.json``."""
    return name_or_path.strip("/").replace("/", "--") + ".json"


def find_model_facts(name_or_path: str, model_config: str | Path | None = None,
                     models_dirs: list[Path] | None = None) -> Path:
    """The ``config.json`` to plan from.

    Order: ``model_config`` (a file, or a folder holding ``config.json``); a local model
    folder ``name_or_path`` with a ``config.json``; ``<dir>/<org>--<name>.json`` in
    ``models_dirs`` (default: ``./configs/models`` then the checkout's ``configs/models``).

    Raises:
        PlanError: nothing found; the message lists where it looked.
    """
    if model_config is not None:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise PlanError(f"--model-config {str(model_config)!r}: no such file (or no config.json in that folder)")
        return path
    if name_or_path.startswith("pkg:"):
        name_or_path = resolve_model_path(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return local / "config.json"
        raise PlanError(f"model.name_or_path {name_or_path!r} is a folder without config.json "
                        "(a GGUF-only folder?); pass --model-config with a config.json")
    if name_or_path.startswith((".", "/", "~")):
        raise PlanError(f"model.name_or_path {name_or_path!r} does not exist (a local path, not a hub id)")
    dirs = models_dirs or [Path.cwd() / "configs" / "models", DEFAULT_MODELS_DIR]
    tried = []
    for folder in dirs:
        candidate = folder / model_facts_name(name_or_path)
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise PlanError(f"no stored config.json facts for model.name_or_path {name_or_path!r}; looked for "
                    f"{', '.join(dict.fromkeys(tried))}. Save the model's config.json there or pass --model-config")


def load_model_facts(path: str | Path) -> dict:
    """A ``config.json`` as a dict, without the ``_``-prefixed notes."""
    path = Path(path)
    facts = read_json(path, PlanError)
    if "model_type" not in facts:
        raise PlanError(f"{path}: no 'model_type' key; is this a Hugging Face config.json?")
    return {k: v for k, v in facts.items() if not k.startswith("_")}


def build_meta_model(facts: dict, dtype: str = "bfloat16") -> nn.Module:
    """The causal LM of ``facts`` on the meta device: every shape, no storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    facts = dict(facts)
    config = AutoConfig.for_model(facts.pop("model_type"), **facts)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def inject_dude_shells(model: nn.Module, adapter: DudeConfig) -> dict[str, tuple[int, int]]:
    """Put uninitialised DuDe layers where a run would (no SVD); return ``name -> (out, in)``.

    Only the DuDe parameters require grad afterwards, as in a run.
    """
    layers = inject_dude(model, adapter, find_targets(model, adapter))
    set_trainable_params(model)
    return {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}


# --------------------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` elements; a tied parameter counts once (``parameters()`` dedups)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def trainable_closed_form(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """``sum r * (in + out) + out`` over the target layers (``A``, ``B`` and ``m``)."""
    return sum(rank * (in_f + out_f) + out_f for out_f, in_f in shapes.values())


def largest_module(model: nn.Module) -> tuple[int, int]:
    """``(elements, trainable elements)`` of the module with the most direct parameters.

    The same definition as DeepSpeed's ``model_to_params`` (which cannot be used on meta
    tensors: it deduplicates by ``data_ptr``, and every meta pointer is 0).
    """
    best, best_trainable = 0, 0
    for module in model.modules():
        direct = list(module.parameters(recurse=False))
        n = sum(p.numel() for p in direct)
        if n > best:
            best, best_trainable = n, sum(p.numel() for p in direct if p.requires_grad)
    return best, best_trainable


def largest_block(model: nn.Module) -> int:
    """Elements of the largest child of the model's largest ``ModuleList`` (a decoder layer);
    0 for a model without one."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return 0
    blocks = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    return max((sum(p.numel() for p in child.parameters()) for child in blocks), default=0)


def gathered_elements(total: int, block: int, largest: int, prefetch: int,
                      max_live: int = MAX_LIVE_PARAMETERS) -> int:
    """Elements of partitioned weights that ZeRO-3 holds gathered at once in a steady-state step.

    With activation checkpointing a decoder layer's weights are gathered for its recompute
    and stay gathered through its backward, and the last layer's stay gathered while the LM
    head runs (reused within ``stage3_max_reuse_distance``; what is kept for reuse is bounded
    by ``stage3_max_live_parameters``; a model without a layer stack keeps its largest
    module). Besides the LM head (the largest module, or the prefetch bucket if that is
    larger), one more module of the largest size stays gathered:
    on the Llama-2-70B-wide rehearsal (benchmarks/scale.py) the steady state after a
    held-out evaluation pass held the embedding as well, 1.38B elements, against 1.12B in
    runs without one. ``block + max(prefetch, largest) + largest``, at most the whole model.
    """
    kept = min(block, max_live) if block else largest  # the decoder layer held for reuse
    return min(total, kept + max(prefetch, largest) + largest)


def step_phases(total: int, block: int, largest: int, prefetch: int, acts: dict[str, int], dtype_bytes: int,
                max_live: int = MAX_LIVE_PARAMETERS, world_size: int = 2) -> dict[str, dict[str, int]]:
    """What a steady-state step holds beyond its fixed states, at its two worst moments (bytes).

    ``head``: the LM head runs (forward, then its backward) while the last decoder layer is
    still gathered (:func:`gathered_elements`), with the logits and the layer checkpoints.
    ``layers_backward``: a decoder layer is recomputed and back-propagated, gathered whole
    with the prefetch of the next one, with its activations and the checkpoints. In both, a
    released module's buffer is still in flight (``in_flight``). With one rank the partition
    is the whole weight and nothing is gathered into new memory (measured on an H200: the
    70B-wide slice's peak is its weights, activations and buckets).
    """
    multi = world_size > 1
    head = gathered_elements(total, block, largest, prefetch, max_live) if multi else 0
    layer = min(total, (min(block, max_live) if block else largest) + prefetch) if multi else 0
    in_flight = dtype_bytes * largest if multi else 0
    return {
        "head": {"gathered": dtype_bytes * head, "in_flight": in_flight,
                 "activations": acts["checkpoints"] + acts["logits"]},
        "layers_backward": {"gathered": dtype_bytes * layer, "in_flight": in_flight,
                            "activations": acts["checkpoints"] + acts["recompute_layer"]},
    }


def buffer_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def persistent_params(model: nn.Module, threshold: int, trainable_whole: bool = True) -> int:
    """Elements of the parameters ZeRO-3 leaves unpartitioned: ``numel <= threshold``, and
    with ``trainable_whole`` every trainable one (the trainer keeps the DuDe parameters whole)."""
    return sum(p.numel() for p in model.parameters()
               if p.numel() <= threshold or (trainable_whole and p.requires_grad))


# --------------------------------------------------------------------------- memory


def logit_bytes(tokens: int, vocab: int, dtype_bytes: int) -> int:
    """What the loss holds at its peak: the logits and their gradient in the model's dtype,
    and one float32 chunk of rows (:func:`dude_dist.loss.summed_cross_entropy`;
    ``LOSS_CHUNK_ELEMENTS``): ``2 t V b + 4 min(t V, chunk)``."""
    logits = tokens * vocab
    return 2 * logits * dtype_bytes + 4 * min(logits, LOSS_CHUNK_ELEMENTS)


def activation_bytes(facts: dict, micro_batch_size: int, seq_len: int, dtype_bytes: int,
                     dude_values_per_layer: int, gradient_checkpointing: bool = True) -> dict[str, int]:
    """Activation memory of one rank for one micro-batch (an estimate, documented here).

    ``t = micro * seq`` tokens, hidden ``h``, ``q = heads * head_dim``, ``kv = kv_heads *
    head_dim``, MLP width ``i``, ``L`` layers, vocab ``V``. Values kept per token by one
    decoder layer (SDPA/flash attention, so no ``seq^2`` score matrix):

        2 RMSNorms x 5h   (bf16 input + fp32 upcast and normalised copy)
        3q + 3kv          (q, k, v; rotary q, k; attention output, as q)
        4i                (gate, up, act(gate), act(gate) * up)
        2h                (o_proj and down_proj outputs for the residual adds)
        + DuDe            (x A^T [r] and the pre-scale output [out] per target)

    ``layer = t * b * values``: as backward walks the layer, each gradient replaces the
    tensor it is computed from, so the layer holds about one set at a time (measured on a
    Llama-2-70B-wide layer in bf16: 258 MiB at 512 tokens and 512 MiB at 1024 for the whole
    step, against 252 and 504 MiB from this count; benchmarks/scale.py). With checkpointing only each layer's input survives the
    forward (``checkpoints = L * t * h * b``) plus one recomputed layer; without it, all
    ``L`` layers are kept. ``logits``: :func:`logit_bytes`.
    """
    h = facts["hidden_size"]
    heads = facts["num_attention_heads"]
    head_dim = facts.get("head_dim") or h // heads
    q = heads * head_dim
    kv = facts.get("num_key_value_heads", heads) * head_dim
    inter = facts["intermediate_size"]
    n_layers = facts["num_hidden_layers"]
    tokens = micro_batch_size * seq_len
    values = 2 * 5 * h + 3 * q + 3 * kv + 4 * inter + 2 * h + dude_values_per_layer
    layer = tokens * dtype_bytes * values
    if gradient_checkpointing:
        kept = {"checkpoints": n_layers * tokens * h * dtype_bytes, "recompute_layer": layer}
    else:
        kept = {"checkpoints": 0, "recompute_layer": n_layers * layer}
    kept["logits"] = logit_bytes(tokens, facts["vocab_size"], dtype_bytes)
    return kept


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by what holds them (see the module docstring for each formula)."""

    params: int
    grads: int
    optimizer: int
    optimizer_step: int
    persistent: int
    buffers: int
    gathered: int
    in_flight: int
    buckets: int
    activations: int
    reserve: int
    activations_detail: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        """What DeepSpeed's estimator covers: params, grads, optimizer and the gathered module."""
        return self.params + self.grads + self.optimizer + self.optimizer_step + self.gathered

    @property
    def step_transient(self) -> int:
        """Gathered weights, in-flight buffers and activations at the step's worst moment.

        ``gathered`` and ``activations`` are each their largest over the step, but they peak
        at different moments (:func:`step_phases`); the step needs the larger phase sum.
        """
        if not self.phases:
            return self.gathered + self.in_flight + self.activations
        return max(sum(parts.values()) for parts in self.phases.values())

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.optimizer_step + self.persistent + self.buffers
                + self.buckets + self.step_transient + self.reserve)

    def to_dict(self) -> dict:
        return {**asdict(self), "model_states": self.model_states, "step_transient": self.step_transient,
                "total": self.total}


def zero_model_states(total_params: int, trainable_params: int, largest: int, largest_trainable: int,
                      world_size: int, dtype_bytes: int = 2, stage: int = 3,
                      sub_group_size: int = SUB_GROUP_SIZE, grad_bytes: int | None = None) -> dict[str, int]:
    """Params, grads, optimizer states and the gathered weights per GPU (no offload).

    Stage 1 partitions the optimizer states, 2 also the gradients, 3 also the parameters
    (and only stage 3 gathers weights while they run). ``largest`` is the number of
    elements gathered at once: the largest module for DeepSpeed's estimator,
    :func:`gathered_elements` for a plan. ``grad_bytes`` is the size of an accumulated
    gradient element (default: the model dtype's); with float32 accumulation (4, what
    :func:`dude_dist.zero.build_ds_config` asks for in bf16) the optimizer steps on the
    accumulated partition itself and no float32 copy is made.
    """
    grad_bytes = grad_bytes or dtype_bytes

    def part(n: int, partitioned: bool) -> int:
        return -(-n // world_size) if partitioned else n

    trainable = part(trainable_params, stage >= 2)
    return {
        "params": dtype_bytes * part(total_params, stage == 3),
        "grads": grad_bytes * trainable,
        "optimizer": ADAM_STATE_BYTES * part(trainable_params, stage >= 1),
        "optimizer_step": 0 if grad_bytes == FP32_GRAD_BYTES
        else FP32_GRAD_BYTES * min(part(trainable_params, stage >= 1), sub_group_size),
        # One rank's partition is the whole weight: ZeRO-3 gathers nothing into new memory.
        "gathered": dtype_bytes * (largest + largest_trainable) if stage == 3 and world_size > 1 else 0,
    }


def deepspeed_estimate(total_params: int, largest_layer_params: int, num_gpus_per_node: int,
                       num_nodes: int) -> int:
    """DeepSpeed's own per-GPU estimate (ZeRO-3, no offload, all parameters trainable)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, num_gpus_per_node=num_gpus_per_node, num_nodes=num_nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return int(gpu_mem)


# --------------------------------------------------------------------------- SVD timing


def calibrate_svd_gflops(adapter: DudeConfig, size: int = 4096, dtype: str = "float32",
                         threads: int | None = None, device: str = "cpu") -> float:
    """This machine's throughput in ``svd_cost`` units (:func:`dude_dist.svd_init.measure_svd_gflops`),
    for a ``size x size`` weight of ``dtype`` on ``device`` (the CPU by default, with
    ``threads`` torch threads; None: as set now).

    The range finder multiplies the weight by ``rank + oversample`` columns, few enough that
    it streams the weight from memory: a weight that fits in cache factorises ~25% faster per
    ``svd_cost`` unit than a 32B/70B projection (measured: 20 against 16 Gflop/s, one core),
    so the probe's 4096 x 4096 (64 MiB in float32) is out of cache like they are.

    A CPU run's ranks share the cores (``OMP_NUM_THREADS=1`` each on 2 cores), so the probe
    runs with a rank's share. A GPU is much faster: pass ``svd_gflops`` for the cluster's
    figure (the trainer measures the device it runs on and logs its own estimate).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return measure_svd_gflops(adapter.rank, adapter.svd, oversample=adapter.svd_oversample,
                                  niter=adapter.svd_niter, size=size, dtype=getattr(torch, dtype), device=device)
    finally:
        torch.set_num_threads(before)


HOST_PER_RANK_GIB = 3.0  # a GPU rank's own host memory: CUDA context, torch, NCCL, DeepSpeed, data


def host_memory(base_params: int, largest: int, gpus_per_node: int, dtype_bytes: int, *, params_partition: int,
                optimizer_partition: int, offload_param: bool, offload_optimizer: bool,
                per_rank: int = int(HOST_PER_RANK_GIB * GIB), world_size: int = 2) -> dict[str, int]:
    """Host RAM of one node (bytes), while loading and in steady state.

    Loading under ``zero.Init`` with transformers: global rank 0 maps every safetensors shard
    of the checkpoint (``b * P`` bytes of page cache on node 0, file-backed, so reclaimable
    but resident while the load runs) and copies each weight into its gathered parameter;
    the other ranks read nothing from the files. Each rank builds one module whole before
    partitioning it, and gathers one module whole to load it (``2 b L`` for the largest
    module ``L``; one rank gathers nothing: ``b L``); on a GPU both are device memory. Offloaded parameters or optimizer
    states live in host RAM for the whole run.
    """
    offloaded = (params_partition if offload_param else 0) + (optimizer_partition if offload_optimizer else 0)
    steady = gpus_per_node * (per_rank + offloaded)
    checkpoint = dtype_bytes * base_params
    return {"per_rank_process": per_rank, "offloaded_per_rank": offloaded, "checkpoint_mapped_by_rank0": checkpoint,
            "module_while_loading_per_rank": (2 if world_size > 1 else 1) * dtype_bytes * largest,
            "node0_while_loading": steady + checkpoint, "node_steady": steady}


def svd_layer_seconds(out_features: int, in_features: int, adapter: DudeConfig, svd_gflops: float) -> float:
    """Estimated seconds of factorising one ``[out, in]`` weight at ``svd_gflops``."""
    return svd_cost(out_features, in_features, adapter.rank, adapter.svd, oversample=adapter.svd_oversample,
                    niter=adapter.svd_niter) / (svd_gflops * 1e9)


def gather_traffic(frozen_bytes: int, nodes: int, gpus_per_node: int, micro_batches: int, passes: int) -> dict:
    """Bytes of frozen weights each GPU receives per optimizer step under ZeRO-3.

    Every pass over the model (forward, the recompute of activation checkpointing, backward)
    all-gathers each frozen weight: a GPU receives ``(P-1)/P`` of the weights per pass, of
    which ``(P-G)/P`` come from other nodes (``P`` ranks, ``G`` per node). With ZeRO++ hpZ
    (``deepspeed.hpz_partition_size = G``) the passes gather from a node-local copy: nothing
    crosses nodes for the frozen weights, at the price of a ``1/G`` share of them per GPU.

    Returns:
        ``flat`` and ``hpz``, each with ``total`` and ``inter_node`` bytes per GPU per step,
        and ``hpz_extra_bytes_per_gpu``.
    """
    world = nodes * gpus_per_node
    per_pass = frozen_bytes * (world - 1) / world
    count = passes * micro_batches
    flat = {"total": count * per_pass, "inter_node": count * frozen_bytes * (world - gpus_per_node) / world}
    hpz = {"total": count * frozen_bytes * (gpus_per_node - 1) / gpus_per_node, "inter_node": 0.0}
    return {"flat": flat, "hpz": hpz, "passes_per_micro_batch": passes, "micro_batches": micro_batches,
            "hpz_extra_bytes_per_gpu": frozen_bytes / gpus_per_node if nodes > 1 else 0.0}


def step_estimate(flops: FlopModel, tokens: int, sample_tokens: int, passes: int, world_size: int,
                  peak_tflops: float, mfu: float) -> dict:
    """Model FLOPs of one optimizer step and the time it takes at ``mfu`` of ``peak_tflops``.

    Args:
        flops: the model's :class:`FlopModel`.
        tokens: real tokens per optimizer step (all ranks).
        sample_tokens: tokens per sample, for attention (``max_seq_len``: an upper bound).
            The LM head is counted at every token, as if each were a target (an upper
            bound too: a run counts it at its labelled targets).
        passes: forward passes per step over all ranks (micro-batches).
        world_size: GPUs.
        peak_tflops: one GPU's dense bf16 peak.
        mfu: the fraction of it the run achieves.
    """
    step = flops.step_flops(tokens, tokens * sample_tokens, passes)
    seconds = step / (world_size * peak_tflops * 1e12 * mfu)
    return {"flops_per_step": step, "six_n_flops_per_step": flops.six_n_flops(tokens), "tokens_per_step": tokens,
            "peak_tflops": peak_tflops, "mfu": mfu, "step_seconds": seconds, "tokens_per_s": tokens / seconds,
            "tflops_per_gpu": step / seconds / world_size / 1e12}


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Everything :func:`plan_run` found; ``to_dict`` is what ``launch/plan.py --json`` prints."""

    model: str
    facts_file: str
    nodes: int
    gpus_per_node: int
    base_params: int
    total_params: int
    trainable_params: int
    trainable_closed_form: int
    targets: int
    largest_module_params: int
    zero_stage: int
    memory: MemoryPlan
    gpu_memory_bytes: int
    init: dict
    all_trainable: dict
    traffic: dict
    host: dict
    step: dict

    @property
    def checkpoint_bytes(self) -> int:
        """One checkpoint's size: per trainable number its fp32 master and two Adam moments
        (``trainable.safetensors``) and the model's own copy (``dude_params.safetensors``, fp32)."""
        return 16 * self.trainable_params

    @property
    def loading_bytes(self) -> int:
        """Per-rank peak while the model loads: its partition, buffers, and the largest module
        built whole and gathered whole (:func:`host_memory`)."""
        return self.memory.params + self.memory.buffers + self.host["module_while_loading_per_rank"]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        keys = ("model", "facts_file", "nodes", "gpus_per_node", "world_size", "base_params", "total_params",
                "trainable_params", "trainable_closed_form", "targets", "largest_module_params", "zero_stage",
                "gpu_memory_bytes", "fits", "init", "all_trainable", "traffic", "host", "checkpoint_bytes", "loading_bytes",
                "step")
        d = {k: getattr(self, k) for k in keys}
        d["memory"] = self.memory.to_dict()
        return d


def check_machine(nodes: int, gpus_per_node: int, gpu_memory_gb: float, reserve_gb: float = 0.0,
                  svd_gflops: float | None = None, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
                  mfu: float = DEFAULT_MFU) -> None:
    """Refuse machine figures no cluster has (before any model is built).

    Raises:
        PlanError: names the flag, the value and what would be valid.
    """
    if nodes < 1:
        raise PlanError(f"--nodes {nodes}: must be at least 1")
    if gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node {gpus_per_node}: must be at least 1 (the planner plans GPU runs; "
                        "for a CPU run give the number of processes)")
    if not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory-gb {gpu_memory_gb}: must be a positive number of GiB (e.g. 80 for an H100)")
    if not math.isfinite(reserve_gb) or reserve_gb < 0:
        raise PlanError(f"--reserve-gb {reserve_gb}: must be a number of GiB >= 0")
    if svd_gflops is not None and (not math.isfinite(svd_gflops) or svd_gflops <= 0):
        raise PlanError(f"--svd-gflops {svd_gflops}: must be a positive throughput in Gflop/s")
    if not math.isfinite(peak_tflops) or peak_tflops <= 0:
        raise PlanError(f"--peak-tflops {peak_tflops}: must be one GPU's positive bf16 peak in TFLOP/s "
                        "(989 for an H100 SXM)")
    if not math.isfinite(mfu) or not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: must be a fraction in (0, 1], e.g. 0.4")


def plan_run(cfg: RunConfig, nodes: int, gpus_per_node: int, *, gpu_memory_gb: float = 80.0,
             svd_gflops: float | None = None, model_config: str | Path | None = None,
             reserve_gb: float = 2.0, all_trainable: bool = False, compare_deepspeed: bool = True,
             peak_tflops: float = DEFAULT_PEAK_TFLOPS, mfu: float = DEFAULT_MFU) -> Plan:
    """Build the meta model with DuDe shells and work out memory and the init plan.

    Args:
        cfg: the run config (model, adapter, batch sizes, max_seq_len, DeepSpeed buckets).
        nodes: number of nodes.
        gpus_per_node: ranks per node.
        gpu_memory_gb: memory of one GPU in GiB (an "80 GB" H100 has 79.6 GiB usable).
        svd_gflops: SVD throughput of one GPU; None = measure this machine (see
            :func:`calibrate_svd_gflops`).
        model_config: a ``config.json`` to use instead of looking one up.
        reserve_gb: fixed allowance for CUDA context, NCCL and allocator slack (GiB).
        all_trainable: count every parameter as trainable (DeepSpeed estimator's mode).
        compare_deepspeed: also report DeepSpeed's estimate (imports deepspeed).
        peak_tflops: one GPU's dense bf16 peak, for the step time.
        mfu: the model FLOPs utilisation assumed for the step time.

    Raises:
        PlanError: the model facts cannot be found or read, or a machine figure is out of
            range (``nodes``/``gpus_per_node`` below 1, a GPU memory, reserve, SVD
            throughput or peak that is not a positive number, an MFU outside (0, 1]).
        ValueError: the targets match nothing.
    """
    check_machine(nodes, gpus_per_node, gpu_memory_gb, reserve_gb, svd_gflops, peak_tflops, mfu)
    world = nodes * gpus_per_node
    batch_layout(cfg.train, world)  # a global batch the world cannot split is an error here too
    facts_path = find_model_facts(cfg.model.name_or_path, model_config)
    facts = load_model_facts(facts_path)
    model = build_meta_model(facts, cfg.model.dtype)
    base_params, _ = count_parameters(model)
    shapes = inject_dude_shells(model, cfg.adapter)
    if all_trainable:
        model.requires_grad_(True)
    total, trainable = count_parameters(model)
    largest, largest_trainable = largest_module(model)
    b = DTYPES[cfg.model.dtype]
    ds = cfg.deepspeed

    live = gathered_elements(total, largest_block(model), largest, ds.stage3_prefetch_bucket_size)
    # build_ds_config accumulates bf16/fp16 gradients in float32 (data_types.grad_accum_dtype).
    states = zero_model_states(total, trainable, live, largest_trainable, world, b, ds.zero_stage,
                               grad_bytes=FP32_GRAD_BYTES if b == 2 else b)
    rank = cfg.adapter.rank
    dude_values = sum(rank + out_f for out_f, _ in shapes.values()) // facts["num_hidden_layers"]
    acts = activation_bytes(facts, cfg.train.micro_batch_size, cfg.data.max_seq_len, b, dude_values,
                            cfg.train.gradient_checkpointing)
    phases = step_phases(total, largest_block(model), largest, ds.stage3_prefetch_bucket_size, acts, b,
                         world_size=world) if ds.zero_stage == 3 else {}
    memory = MemoryPlan(
        **states,
        persistent=b * persistent_params(model, ds.stage3_param_persistence_threshold, not all_trainable)
        if ds.zero_stage == 3 else 0,
        buffers=buffer_bytes(model),
        in_flight=b * largest if ds.zero_stage == 3 and world > 1 else 0,
        buckets=FP32_GRAD_BYTES * ds.reduce_bucket_size,
        activations=max(parts["activations"] for parts in phases.values()) if phases else sum(acts.values()),
        reserve=int(reserve_gb * GIB), activations_detail=acts, phases=phases)

    init = plan_init(shapes, world, cfg.adapter)
    source = ("given" if svd_gflops else
              f"measured on this machine's CPU, {max(1, (os.cpu_count() or 1) // gpus_per_node)} thread(s) per rank")
    gflops = svd_gflops or calibrate_svd_gflops(cfg.adapter, dtype=cfg.model.dtype,
                                                threads=max(1, (os.cpu_count() or 1) // gpus_per_node))
    init_dict = {
        "svd": cfg.adapter.svd, "svd_gflops": gflops, "svd_gflops_source": source,
        "layers_per_rank": [len(init.layers_of(r)) for r in range(world)],
        "flops_per_rank": init.load,
        "seconds_per_rank": [load / (gflops * 1e9) for load in init.load],
        "bytes_broadcast": sum(4 * (rank * (i + o) + o) for o, i in shapes.values()),
        "bytes_residual": sum(b * o * i for o, i in shapes.values()),
        # On the owner of the largest target while it factorises: the gathered weight and the
        # float32 copy the range finder multiplies with.
        "transient_bytes": max(((b + 4) * o * i for o, i in shapes.values()), default=0),
    }

    host = host_memory(base_params, largest, gpus_per_node, b, params_partition=memory.params,
                       optimizer_partition=memory.optimizer + memory.optimizer_step,
                       offload_param=ds.offload_param != "none", offload_optimizer=ds.offload_optimizer != "none",
                       world_size=world)
    layout = batch_layout(cfg.train, world)
    step = step_estimate(FlopModel.from_model(model, cfg.train.gradient_checkpointing),
                         layout.global_batch_size * cfg.data.max_seq_len, cfg.data.max_seq_len,
                         world * layout.grad_accum, world, peak_tflops, mfu)
    traffic = gather_traffic(b * base_params, nodes, gpus_per_node, layout.grad_accum,
                             3 if cfg.train.gradient_checkpointing else 2)

    # DeepSpeed's estimator assumes every parameter is trained; put ours in that mode too.
    all_states = zero_model_states(total, total, largest, largest, world, b, stage=3)
    comparison = {"ours_model_states": sum(all_states.values())}
    if compare_deepspeed:
        comparison["deepspeed_model_states"] = deepspeed_estimate(total, largest, gpus_per_node, nodes)
        comparison["ratio"] = comparison["ours_model_states"] / comparison["deepspeed_model_states"]
    return Plan(
        model=cfg.model.name_or_path, facts_file=str(facts_path), nodes=nodes, gpus_per_node=gpus_per_node,
        base_params=base_params, total_params=total, trainable_params=trainable,
        trainable_closed_form=trainable_closed_form(shapes, rank), targets=len(shapes),
        largest_module_params=largest, zero_stage=ds.zero_stage, memory=memory,
        gpu_memory_bytes=int(gpu_memory_gb * GIB), init=init_dict, all_trainable=comparison, traffic=traffic,
        host=host,
        step=step)


def format_plan(plan: Plan) -> str:
    """The human-readable report ``launch/plan.py`` prints."""
    g = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    m, init = plan.memory, plan.init
    lines = [
        f"model {plan.model}  (facts: {plan.facts_file})",
        f"world {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.world_size} ranks",
        f"parameters: base model {plan.base_params:,} ({plan.base_params / 1e9:.2f} B); with DuDe "
        f"{plan.total_params:,}; trainable "
        f"{plan.trainable_params:,} ({100 * plan.trainable_params / plan.total_params:.3f}%); "
        f"closed form sum r(in+out)+out over {plan.targets} targets = {plan.trainable_closed_form:,}",
        f"per-GPU memory (ZeRO stage {plan.zero_stage}):",
    ]
    for key in ("params", "grads", "optimizer", "optimizer_step", "persistent", "buffers", "gathered", "in_flight",
                "buckets", "activations", "reserve"):
        lines.append(f"  {key:15s}{g(getattr(m, key))}")
    detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.activations_detail.items())
    lines.append(f"    activations: {detail} GiB")
    if m.phases:
        worst = max(m.phases, key=lambda k: sum(m.phases[k].values()))
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.phases[worst].items())
        lines.append(f"    gathered, in_flight and activations peak at different moments; the worst, {worst}: "
                     f"{parts} GiB")
    lines += [
              f"  {'total':15s}{g(m.total)}  of {g(plan.gpu_memory_bytes)}  -> "
              f"{'fits' if plan.fits else 'DOES NOT FIT'}"]
    cmp = plan.all_trainable
    line = f"all-trainable model states: ours {cmp['ours_model_states'] / GIB:.2f} GiB"
    if "deepspeed_model_states" in cmp:
        line += f", DeepSpeed's estimator {cmp['deepspeed_model_states'] / GIB:.2f} GiB (ratio {cmp['ratio']:.3f})"
    secs = init["seconds_per_rank"]
    t, st = plan.traffic, plan.step
    h = plan.host
    lines += [
        line,
        f"while loading: {plan.loading_bytes / GIB:.2f} GiB per GPU (partition + the largest module built and "
        f"gathered whole); init: {init['transient_bytes'] / GIB:.2f} GiB more on the owner of the largest target",
        f"host RAM per node: {h['node_steady'] / GIB:.1f} GiB steady ({plan.gpus_per_node} ranks x "
        f"{h['per_rank_process'] / GIB:.1f} GiB allowance"
        + (f" + {h['offloaded_per_rank'] / GIB:.2f} GiB offloaded" if h["offloaded_per_rank"] else "")
        + f"); node 0 while loading: {h['node0_while_loading'] / GIB:.1f} GiB (global rank 0 maps the whole "
        f"checkpoint, {h['checkpoint_mapped_by_rank0'] / GIB:.1f} GiB of page cache)",
        f"checkpoint: {plan.checkpoint_bytes / 1e6:.0f} MB (fp32 masters, Adam moments and DuDe tensors; "
        "the frozen weights are never saved)",
        f"frozen-weight gathers per GPU per step ({t['micro_batches']} micro-batches x {t['passes_per_micro_batch']} "
        f"passes): {t['flat']['total'] / 1e9:.1f} GB, {t['flat']['inter_node'] / 1e9:.1f} GB across nodes; with "
        f"hpz_partition_size={plan.gpus_per_node}: {t['hpz']['total'] / 1e9:.1f} GB, 0 across nodes"
        + (f", +{t['hpz_extra_bytes_per_gpu'] / GIB:.2f} GiB per GPU" if plan.nodes > 1 else " (one node: no gain)"),
        f"step: {st['tokens_per_step']:,} tokens (global batch x max_seq_len), {st['flops_per_step'] / 1e15:.1f} "
        f"PFLOP of model FLOPs (a 6N count would say {st['six_n_flops_per_step'] / 1e15:.1f}); at MFU "
        f"{100 * st['mfu']:.0f}% of {st['peak_tflops']:.0f} TFLOP/s per GPU: {st['step_seconds']:.2f} s per step, "
        f"{st['tokens_per_s']:,.0f} tokens/s",
        f"init plan ({init['svd']} SVD, {init['svd_gflops']:.1f} Gflop/s {init['svd_gflops_source']}):",
        f"  layers per rank min/max {min(init['layers_per_rank'])}/{max(init['layers_per_rank'])}; "
        f"SVD seconds per rank min/max {min(secs):.1f}/{max(secs):.1f}",
        f"  broadcast factors {init['bytes_broadcast'] / 1e6:.1f} MB vs residuals "
        f"{init['bytes_residual'] / 1e6:.1f} MB ({100 * init['bytes_broadcast'] / init['bytes_residual']:.2f}%)",
    ]
    return "\n".join(lines)


def check_replicated_model_fits(cfg: RunConfig, world_size: int, ranks_per_node: int, host_bytes: int,
                                gpu_bytes: int | None) -> None:
    """Refuse ZeRO stage 0-2 on several ranks when the model cannot be held whole by each.

    Below stage 3 every rank builds and keeps the whole model (70B in bf16: ~138 GB per rank,
    in host RAM while loading). The parameter count comes from the model's ``config.json``
    (built on the meta device), so this runs before anything loads; a model whose facts
    cannot be found is let through.

    Raises:
        ConfigError: the ranks of one node need more host RAM, or one rank more GPU memory,
            than there is (the message gives both figures and what to set instead).
    """
    if cfg.deepspeed.zero_stage == 3 or world_size == 1:
        return

    try:
        facts = load_model_facts(find_model_facts(cfg.model.name_or_path))
    except PlanError:
        return
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    model_bytes = count_parameters(build_meta_model(facts))[0] * dtype_bytes
    need_host = model_bytes * ranks_per_node
    gib = 2**30
    advice = "use deepspeed.zero_stage=3, which partitions the weights over the ranks"
    if need_host > 0.9 * host_bytes:
        raise ConfigError(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} on {world_size} ranks: each rank holds the whole model "
            f"({model_bytes / gib:.1f} GiB), {need_host / gib:.1f} GiB for the {ranks_per_node} ranks of this node, "
            f"but the node has {host_bytes / gib:.1f} GiB of RAM; {advice}")
    if gpu_bytes is not None and model_bytes > 0.9 * gpu_bytes:
        raise ConfigError(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} on {world_size} ranks: each GPU would hold the whole "
            f"model ({model_bytes / gib:.1f} GiB) but has {gpu_bytes / gib:.1f} GiB; {advice}")
