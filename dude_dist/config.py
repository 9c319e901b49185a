"""Run configuration schema: frozen dataclasses, a docstring per field.

Loading (YAML, ``--set``, coercion) is :mod:`dude_dist.config_loader`.

Precedence, highest first: ``--set key=value`` on the command line > the YAML file >
the defaults written below. Every key the YAML or ``--set`` names must exist; a typo is
an error that names the file, line and the closest valid key. Values are checked for
type and range when the dataclass is built, and derived values (the global batch size)
are computed once, in :func:`batch_layout`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from dude_dist.dude import NORM_GRADS
from dude_dist.errors import ConfigError, DudeError  # noqa: F401  (DudeError re-exported)
from dude_dist.svd_init import SVD_METHODS, VARIANTS

# One table of model dtypes: name -> bytes per element (torch.<name> is the dtype).
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
FORMATS = ("gsm8k", "metamathqa", "commonsense", "alpaca", "chat")
GSM8K_PROMPT_FORMATS = ("gsm8k", "metamathqa", "commonsense", "alpaca")
EVAL_MODES = ("generate", "loglik")
# Attention kernels a run may ask for; each sees packed samples' boundaries (dude_dist/data.py).
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")




def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class DudeConfig:
    """The adapter: which Linear layers get DuDe, with what rank, variant and SVD.

    Attributes:
        targets: module-name suffixes (``q_proj``) or, if a value starts with ``re:``,
            a regular expression matched against the full module name.
        rank: rank ``r`` of the update.
        variant: where the singular values go: ``dude`` (paper default), ``dude_a``, ``dude_b``.
        svd: ``exact`` (``torch.linalg.svd``) or ``randomized``.
        norm_grad: ``exact`` differentiates through the row norm (paper Eq. 8-9);
            ``detach`` treats it as a constant in backward (DoRA's memory trick).
        recompute: recompute the pre-scale output ``[tokens, out]`` in backward instead of
            keeping it: the layer then keeps what LoRA keeps (its input and ``x A^T``) for
            one more ``[tokens, in] x [in, out]`` matmul in backward. For long sequences
            without activation checkpointing.
        svd_oversample: extra columns of the randomized range finder.
        svd_niter: power iterations of the randomized range finder.
        seed: mixed with each layer name to seed the randomized SVD.
    """

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 16
    variant: str = "dude"
    svd: str = "exact"
    norm_grad: str = "exact"
    recompute: bool = False
    svd_oversample: int = 16
    svd_niter: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        _check(len(self.targets) > 0, "adapter.targets", "needs at least one target")
        _check(self.rank > 0, "adapter.rank", f"must be > 0, got {self.rank}")
        _check_choice(self.variant, VARIANTS, "adapter.variant")
        _check_choice(self.svd, SVD_METHODS, "adapter.svd")
        _check_choice(self.norm_grad, NORM_GRADS, "adapter.norm_grad")
        _check(self.svd_oversample >= 0, "adapter.svd_oversample", f"must be >= 0, got {self.svd_oversample}")
        _check(self.svd_niter >= 0, "adapter.svd_niter", f"must be >= 0, got {self.svd_niter}")


@dataclass(frozen=True)
class ModelConfig:
    """The base model.

    Attributes:
        name_or_path: a local Hugging Face folder or a hub id.
        revision: hub revision (part of the factor-cache key).
        gguf_file: a GGUF file inside ``name_or_path`` to load (de-quantised) instead.
        gguf_cache: convert a local GGUF file once into a cached Hugging Face folder
            (``$DUDE_DIST_CACHE``, default ``~/.cache/dude_dist``) and load that.
        dtype: parameter dtype: ``bfloat16``, ``float16`` or ``float32``.
        trust_remote_code: passed to ``from_pretrained``; off unless set here.
        attn_implementation: ``sdpa`` (PyTorch's fused attention; packed samples are
            attended one at a time, :mod:`dude_dist.attention`), ``flash_attention_2`` (needs the ``flash_attn``
            package and a CUDA GPU; packed rows run as variable-length sequences, the
            fastest choice with ``data.packing``) or ``eager``. Checked against what is
            installed when the model loads (:func:`attn_implementation_problem`).
    """

    name_or_path: str = ""
    revision: str | None = None
    gguf_file: str | None = None
    gguf_cache: bool = True
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path", "is required (a local folder or a hub id)")
        _check_choice(self.dtype, tuple(DTYPES), "model.dtype")
        _check_choice(self.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")


def attn_implementation_problem(name: str, cuda: bool | None = None) -> str | None:
    """Why ``model.attn_implementation = name`` cannot run here, or None if it can.

    Args:
        name: one of :data:`ATTN_IMPLEMENTATIONS`.
        cuda: whether a CUDA device is used (None: ``torch.cuda.is_available()``).
    """
    if name != "flash_attention_2":
        return None
    from transformers.utils import is_flash_attn_2_available

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return ("model.attn_implementation: 'flash_attention_2' needs a CUDA GPU; use 'sdpa' (packed samples then "
                "attend one at a time through PyTorch SDPA) or 'eager' on this machine")
    if not is_flash_attn_2_available():
        return ("model.attn_implementation: 'flash_attention_2' needs the flash_attn package (pip install "
                "flash-attn --no-build-isolation, built for this torch and CUDA); or use 'sdpa'")
    return None


@dataclass(frozen=True)
class DataConfig:
    """Training and held-out data.

    Attributes:
        sources: local JSON/JSONL/Parquet files or folders, or hub ids; the first that
            loads is used (so a local copy can be named before its hub id).
        split: split to read from a hub id or folder.
        format: prompt template: ``gsm8k``, ``metamathqa``, ``commonsense``, ``alpaca``, ``chat``.
        max_seq_len: samples are truncated to this many tokens (a count is reported).
        packing: bin-pack whole samples into rows of up to ``max_seq_len`` tokens, each
            sample attending only to itself (same loss and gradients as padding them);
            ``train.micro_batch_size`` and ``train.global_batch_size`` then count rows.
            For short samples (GSM8K, MetaMathQA, commonsense: 100-400 tokens) at a long
            ``max_seq_len``, where a padded batch is mostly padding.
        group_by_length: without packing, put samples of similar length in the same
            micro-batches (sorted within a seeded window of global batches), so little
            of a padded batch is padding.
        limit: use at most this many training samples (0 = all).
        eval_sources: held-out data for ``eval/loss`` (same format); empty = none.
        eval_split: split of ``eval_sources``.
        eval_size: number of held-out samples for ``eval/loss``.
    """

    sources: tuple[str, ...] = ()
    split: str = "train"
    format: str = "gsm8k"
    max_seq_len: int = 512
    packing: bool = False
    group_by_length: bool = False
    limit: int = 0
    eval_sources: tuple[str, ...] = ()
    eval_split: str = "test"
    eval_size: int = 64

    def __post_init__(self) -> None:
        for name in ("sources", "eval_sources"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check_choice(self.format, FORMATS, "data.format")
        _check(self.max_seq_len > 0, "data.max_seq_len", f"must be > 0, got {self.max_seq_len}")
        _check(self.limit >= 0, "data.limit", f"must be >= 0, got {self.limit}")
        _check(self.eval_size >= 0, "data.eval_size", f"must be >= 0, got {self.eval_size}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping.

    ``global_batch_size = micro_batch_size * grad_accum * world_size`` (see
    :func:`batch_layout`); if ``global_batch_size`` is set, ``grad_accum`` is derived
    from it instead and must come out whole.

    Attributes:
        micro_batch_size: samples per rank per forward.
        grad_accum: micro-batches per optimizer step (ignored if global_batch_size is set).
        global_batch_size: samples per optimizer step over all ranks; 0 = derived.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: fraction of steps with linear warm-up, then cosine decay to 0.
        max_steps: optimizer steps; 0 = ``epochs`` passes over the data.
        epochs: passes over the data when ``max_steps`` is 0.
        max_grad_norm: gradient clipping (0 = off).
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        log_every: steps between TensorBoard/console logs.
        save_every: steps between checkpoints (0 = only at the end).
        keep_last: complete checkpoints kept on disk.
        eval_every: steps between ``eval/loss`` (0 = only at the end).
        seed: data order and RNG seed.
        max_nonfinite_steps: consecutive non-finite steps (skipped) before the run stops.
        peak_tflops: the device's dense bf16 peak in TFLOP/s for ``train/mfu``; 0 = look
            the GPU up in :data:`dude_dist.throughput.PEAK_TFLOPS` (no MFU on CPU).
        deepspeed_checkpoint: also write DeepSpeed's own checkpoint files (pickled, bound to
            the world size that wrote them) beside the portable state; off by default.
        log_dynamics: log ``dude/magnitude_drift``, ``dude/direction_change`` and
            ``dude/update_norm`` (:mod:`dude_dist.dynamics`) at step 1, every
            ``dynamics_every`` steps and the last step.
        dynamics_every: steps between the ``dude/*`` measurements (0 = every 10th logged
            step). Each one costs every DuDe layer two ``[out, r]`` products with its frozen
            weight and a few dozen small kernels in that step's first forward; on a GPU a
            small kernel costs its launch, and a 70B model with all seven projections
            adapted has 560 DuDe layers, so every step would be too often.
        histogram_every: steps between per-layer-type histograms of the dynamics, taken at
            steps that measure them (0 = every 10th logged step).
    """

    micro_batch_size: int = 1
    grad_accum: int = 1
    global_batch_size: int = 0
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    max_steps: int = 0
    epochs: float = 1.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    log_every: int = 1
    save_every: int = 0
    keep_last: int = 2
    eval_every: int = 0
    seed: int = 42
    max_nonfinite_steps: int = 3
    peak_tflops: float = 0.0
    deepspeed_checkpoint: bool = False
    log_dynamics: bool = True
    dynamics_every: int = 0
    histogram_every: int = 0

    def measures_dynamics(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step ``step`` (1-based) of ``total_steps`` logs the ``dude/*``
        dynamics: step 1, every ``dynamics_every`` steps (0: every 10th logged step) and
        the last one."""
        every = self.dynamics_every or 10 * self.log_every
        return step == 1 or step % every == 0 or step == total_steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        for key in ("micro_batch_size", "grad_accum", "log_every", "keep_last", "max_nonfinite_steps"):
            _check(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("global_batch_size", "max_steps", "save_every", "eval_every", "max_grad_norm", "weight_decay",
                    "peak_tflops", "histogram_every", "dynamics_every"):
            _check(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.max_steps > 0 or self.epochs > 0, "train.epochs", "must be > 0 when train.max_steps is 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
               f"must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The DeepSpeed engine, built from these keys (a JSON file may override them).

    Attributes:
        zero_stage: 0-3; 3 partitions parameters, gradients and optimizer states.
        offload_optimizer: ``none`` or ``cpu``.
        offload_param: ``none`` or ``cpu`` (stage 3 only).
        reduce_bucket_size: elements per gradient reduce bucket.
        stage3_prefetch_bucket_size: elements prefetched ahead of use.
        stage3_param_persistence_threshold: parameters smaller than this stay unpartitioned.
        config_file: a DeepSpeed JSON whose keys override the ones built from this section.
        backend: ``auto`` (nccl on GPU, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_s: collective timeout while the model loads and the init runs (a first
            download of a 70B model can take long).
        step_timeout_s: collective timeout from the first training step on: a rank that is
            lost or hangs ends the run after at most this long.
        hpz_partition_size: ZeRO++ hierarchical partitioning: frozen weights keep a second
            copy sharded over this many ranks (the GPUs of one node), so forward, recompute
            and backward gather them inside the node instead of across the network. 1 = off.
    """

    zero_stage: int = 3
    offload_optimizer: str = "none"
    offload_param: str = "none"
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    config_file: str | None = None
    backend: str = "auto"
    timeout_s: int = 1800
    step_timeout_s: int = 600
    hpz_partition_size: int = 1

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {self.zero_stage}")
        _check(self.step_timeout_s > 0, "deepspeed.step_timeout_s", f"must be > 0, got {self.step_timeout_s}")
        _check(self.hpz_partition_size >= 1, "deepspeed.hpz_partition_size",
               f"must be >= 1 (1 = off), got {self.hpz_partition_size}")
        _check(self.offload_param == "none" or self.zero_stage == 3, "deepspeed.offload_param",
               f"{self.offload_param!r} needs zero_stage 3 (parameters are partitioned only there), "
               f"got zero_stage {self.zero_stage}")
        _check(self.hpz_partition_size == 1 or self.zero_stage == 3, "deepspeed.hpz_partition_size",
               f"{self.hpz_partition_size} needs zero_stage 3, got zero_stage {self.zero_stage}")
        _check_choice(self.offload_optimizer, ("none", "cpu"), "deepspeed.offload_optimizer")
        _check_choice(self.offload_param, ("none", "cpu"), "deepspeed.offload_param")
        _check_choice(self.backend, ("auto", "nccl", "gloo"), "deepspeed.backend")
        _check(self.timeout_s > 0, "deepspeed.timeout_s", f"must be > 0, got {self.timeout_s}")
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            _check(getattr(self, key) >= 0, f"deepspeed.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class EvalConfig:
    """Accuracy evaluation (generation) at the start and/or end of a run.

    Attributes:
        tasks: ``gsm8k`` and/or commonsense task names (``boolq``, ``piqa``, ...).
        gsm8k_sources: GSM8K test file/folder or hub id, first that loads wins.
        commonsense_dir: folder with ``<task>/test.json`` in LLM-Adapters format.
        gsm8k_format: the training prompt format that GSM8K questions are put in, so a
            model trained on ``metamathqa`` or ``commonsense``/``alpaca`` data is asked
            the way it was trained: ``gsm8k``, ``metamathqa``, ``commonsense``, ``alpaca``.
        limit: items per task (0 = all).
        batch_size: prompts per generation batch.
        max_new_tokens: generation length.
        at_start: evaluate before training.
        at_end: evaluate after training.
        gather_below_gb: under ZeRO-3 with several ranks, a model whose weights take less
            than this many GiB is evaluated from a merged copy on every rank (no parameter
            gather per generated token); larger models generate under ZeRO-3 with the ranks
            kept in step (``synced_gpus``).
        mode: ``generate`` (greedy generation, the answer read from the text, as LLM-Adapters
            scores) or ``loglik`` (multiple choice as lm-eval scores it: each option's text
            after ``Question: ...\nAnswer:``, the highest log-likelihood per character wins;
            commonsense tasks only; it has signal on models too small to generate).
    """

    tasks: tuple[str, ...] = ("gsm8k",)
    gsm8k_sources: tuple[str, ...] = ("../shared/data/gsm8k/test.jsonl", "openai/gsm8k:main")
    commonsense_dir: str = "../shared/data/commonsense"
    gsm8k_format: str = "gsm8k"
    limit: int = 0
    batch_size: int = 8
    max_new_tokens: int = 256
    at_start: bool = False
    at_end: bool = False
    gather_below_gb: float = 2.0
    mode: str = "generate"

    def __post_init__(self) -> None:
        for name in ("tasks", "gsm8k_sources"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check_choice(self.gsm8k_format, GSM8K_PROMPT_FORMATS, "eval.gsm8k_format")
        _check_choice(self.mode, EVAL_MODES, "eval.mode")
        _check(self.mode != "loglik" or "gsm8k" not in self.tasks, "eval.tasks",
               "gsm8k has no answer choices to score with eval.mode=loglik (its held-out loss is eval/loss); "
               f"use commonsense tasks there, got {list(self.tasks)}")
        _check(self.limit >= 0, "eval.limit", f"must be >= 0, got {self.limit}")
        _check(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.max_new_tokens > 0, "eval.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _check(self.gather_below_gb >= 0, "eval.gather_below_gb", f"must be >= 0, got {self.gather_below_gb}")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one YAML file maps onto this, section by section."""

    model: ModelConfig
    output_dir: str = "runs/default"
    adapter: DudeConfig = field(default_factory=DudeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir", "must not be empty")
        # Without ZeRO, DeepSpeed accumulates gradients in the model's dtype only, and the DuDe
        # gradients are accumulated and reduced in fp32 (zero.build_ds_config).
        _check(self.deepspeed.zero_stage > 0 or self.model.dtype == "float32", "deepspeed.zero_stage",
               f"0 (ZeRO off) needs model.dtype float32, got {self.model.dtype}: DeepSpeed then accumulates "
               "gradients in the model's dtype, while dude_dist keeps the DuDe gradients in fp32; use zero_stage 2 "
               "(or 3) with a 16-bit model")


@dataclass(frozen=True)
class BatchLayout:
    """Derived batch arithmetic: ``global = micro * accum * world``."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def per_rank(self) -> int:
        return self.micro_batch_size * self.grad_accum


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """The one place where the batch sizes are derived and checked against the world size.

    Raises:
        ConfigError: ``train.global_batch_size`` is not a multiple of
            ``micro_batch_size * world_size``.
    """
    if train.global_batch_size:
        per_step = train.micro_batch_size * world_size
        if train.global_batch_size % per_step:
            valid = [per_step * k for k in range(1, 5)]
            raise ConfigError(
                f"train.global_batch_size: {train.global_batch_size} is not a multiple of "
                f"micro_batch_size {train.micro_batch_size} x world size {world_size} = {per_step}; "
                f"valid values include {valid}"
            )
        return BatchLayout(train.micro_batch_size, train.global_batch_size // per_step, world_size)
    return BatchLayout(train.micro_batch_size, train.grad_accum, world_size)


def config_to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def __getattr__(name: str):
    """``from dude_dist.config import load_config`` keeps working: the loader lives in
    :mod:`dude_dist.config_loader`, imported on first use (it imports this module)."""
    if name in ("load_config", "parse_overrides", "apply_overrides"):
        from dude_dist import config_loader  # noqa: PLC0415  (it imports this module)

        return getattr(config_loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
