"""Model FLOPs of adapter training, and the device peaks that MFU is measured against.

    python -c "from dude_dist.throughput import peak_tflops; print(peak_tflops('NVIDIA H100 80GB HBM3'))"

Counted per real (non-padding) token, ``N`` the elements of every frozen weight that
multiplies each token (all Linear layers of the decoder; embeddings are lookups; the LM
head, ``V h``, is counted per labelled target, below)::

    frozen weights   forward 2N + input-gradient backward 2N (+ 2N recompute)
    DuDe [out, in]   x A^T and (x A^T) B^T: forward 2r(in+out), backward 4r(in+out)
                     (input and weight gradients of A and B) (+ 2r(in+out) recompute);
                     adapter.recompute adds 2 in out (x W_f^T rebuilt in backward)
    attention        per layer and sample of n tokens, causal: forward 2 n^2 d
                     (QK^T and PV over half of the n x n scores, d = heads * head_dim),
                     backward twice that (+ forward again on recompute)

and per forward pass (micro-batch), not per token, the row norms of each DuDe layer:
``W_f A^T`` (2 r in out) forward, and its gradient for ``A`` (2 r in out) with
``norm_grad: exact``, both again on recompute; activation checkpointing does not
recompute the LM head. Two small over-counts, accepted to keep the
count model-independent: torch's non-reentrant checkpoint stops recomputing a layer once
its saved tensors are back, so the layer's last frozen matmul (the MLP down projection,
which saves nothing) is not run again; and the first layer's frozen projections need no
input gradient (the embeddings are frozen).

Frozen weights get no weight gradient, so the backward pass costs 2N per token, not 4N: the
usual ``6N`` (full fine-tuning: forward 2N, backward 4N) counts 2N per token of work that
adapter training never does. Divided by the same step time, it reports 1.5x the true MFU
without activation checkpointing; with checkpointing ``6N`` happens to equal forward,
backward and recompute, but then only by counting the recompute as model work, which
this count does too (the step must run it). Attention is counted per
sample, so a packed row of short samples costs what the samples cost, not a full
``max_seq_len`` square. The LM head (forward and input-gradient backward, ``4 V h``) is
counted at the labelled targets only: model FLOPs count the work the loss needs, as they
leave padding out. :mod:`dude_dist.loss` computes logits at exactly those positions for a
micro-batch of one packed row; wider sets it also computes (the union of several rows'
labelled positions, a padded batch's slice from its first label, all positions for a
model without ``logits_to_keep``) are executed but not counted.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from dude_dist.dude import DudeLinear

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s per device, from the vendors' data
# sheets. The longest key contained in torch.cuda.get_device_name() wins, so "H100 PCIe"
# beats "H100". train.peak_tflops overrides the table.
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM; its name is "NVIDIA H100 80GB HBM3"
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "MI300X": 1307.0,
    "MI325X": 1307.0,
    "MI250X": 383.0,
}


def peak_tflops(device_name: str, override: float = 0.0) -> float | None:
    """The bf16 peak of ``device_name`` in TFLOP/s: ``override`` if positive, else the longest
    key of :data:`PEAK_TFLOPS` found in the name (case-insensitive), else None."""
    if override > 0:
        return float(override)
    name = device_name.lower()
    found = [key for key in PEAK_TFLOPS if key.lower() in name]
    return PEAK_TFLOPS[max(found, key=len)] if found else None


@dataclass(frozen=True)
class FlopModel:
    """What one token, one sample and one forward pass cost (see the module docstring).

    Attributes:
        frozen: elements of the frozen weights every token is multiplied by, the LM head
            included (``N`` plus ``head``; what a ``6N`` count takes).
        head: elements of the LM head (part of ``frozen``; counted per target, not recomputed).
        adapter: ``sum 2 r (in + out)`` over DuDe layers: forward flops per token.
        rebuilt: ``sum 2 in out`` over DuDe layers with ``recompute``: flops per token in backward.
        norms: ``sum 2 r in out`` over DuDe layers: row-norm forward flops per pass.
        norm_grads: the same over layers with ``norm_grad: exact``: backward flops per pass.
        attention_width: ``sum heads * head_dim`` over the decoder layers.
        checkpointing: activation checkpointing recomputes the decoder layers' forward.
    """

    frozen: int
    head: int
    adapter: int
    rebuilt: int
    norms: int
    norm_grads: int
    attention_width: int
    checkpointing: bool

    @classmethod
    def from_model(cls, model: nn.Module, checkpointing: bool) -> FlopModel:
        """Read the shapes from a model's modules (no parameter storage is read, so a meta
        model or a ZeRO-3 partitioned one works) and its config's attention sizes."""
        frozen = adapter = rebuilt = norms = norm_grads = 0
        for module in model.modules():
            if isinstance(module, DudeLinear):
                size = module.in_features * module.out_features
                frozen += size
                adapter += 2 * module.rank * (module.in_features + module.out_features)
                rebuilt += 2 * size if module.recompute else 0
                norms += 2 * module.rank * size
                norm_grads += 2 * module.rank * size if module.norm_grad == "exact" else 0
            elif isinstance(module, nn.Linear):
                frozen += module.in_features * module.out_features
        get_head = getattr(model, "get_output_embeddings", None)
        head_module = get_head() if callable(get_head) else None
        head = head_module.in_features * head_module.out_features if isinstance(head_module, nn.Linear) else 0
        config = getattr(model, "config", None)
        width = 0
        if config is not None and getattr(config, "num_attention_heads", None):
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            width = config.num_hidden_layers * heads * head_dim
        return cls(frozen=frozen, head=head, adapter=adapter, rebuilt=rebuilt, norms=norms, norm_grads=norm_grads,
                   attention_width=width, checkpointing=checkpointing)

    def step_flops(self, tokens: int, square_lengths: int, passes: int, logits: int | None = None) -> float:
        """Model FLOPs of one optimizer step.

        Args:
            tokens: real tokens of the global batch.
            square_lengths: sum of ``n**2`` over its samples (``n`` tokens each).
            passes: forward passes (micro-batches over all ranks).
            logits: positions the LM head is counted at (the labelled targets); None: every
                token.
        """
        again = 1 if self.checkpointing else 0
        body = self.frozen - self.head
        per_token = 4 * body + again * 2 * body + (3 + again) * self.adapter + self.rebuilt
        head = 4 * self.head * (tokens if logits is None else logits)
        attention = (3 + again) * 2 * self.attention_width * square_lengths
        per_pass = (1 + again) * self.norms + self.norm_grads
        return float(per_token * tokens + head + attention + per_pass * passes)

    def six_n_flops(self, tokens: int) -> float:
        """The full fine-tuning count ``6 N`` per token, for comparison (overstates adapter work)."""
        return 6.0 * self.frozen * tokens


def throughput_scalars(flops: float, tokens: int, slots: int, seconds: float, world_size: int,
                       peak: float | None) -> dict[str, float]:
    """TensorBoard scalars of one step.

    Args:
        flops: :meth:`FlopModel.step_flops` of the step.
        tokens: real tokens of the global batch.
        slots: token positions the model ran on (real tokens plus padding), all ranks.
        seconds: the step's wall time.
        world_size: ranks (devices) that shared the work.
        peak: one device's bf16 peak in TFLOP/s, or None (no ``train/mfu``).

    Returns:
        ``train/tokens_per_s`` (real tokens), ``train/padding_ratio`` (padding over slots),
        ``train/model_tflops_per_s`` (per device) and, with a peak, ``train/mfu``.
    """
    seconds = max(seconds, 1e-9)
    per_device = flops / seconds / world_size / 1e12
    out = {"train/tokens_per_s": tokens / seconds,
           "train/padding_ratio": 1.0 - tokens / slots if slots else 0.0,
           "train/model_tflops_per_s": per_device}
    if peak:
        out["train/mfu"] = per_device / peak
    return out


class StepThroughput:
    """The throughput scalars of a training run's steps, from the host-side sample counts.

    Args:
        model: the trained model (shapes only; a ZeRO-3 partitioned one works).
        sampler: the run's :class:`dude_dist.sampler.StepSampler`.
        counts: the training rows' host-side counts (``shape(indices)`` -> tokens, slots, sum n^2, targets).
        world_size: ranks.
        device: this rank's device (a CUDA device's bf16 peak gives ``train/mfu``).
        checkpointing: activation checkpointing recomputes the decoder layers.
        peak_override: ``train.peak_tflops`` (0: the table).
    """

    def __init__(self, model: nn.Module, sampler, counts, world_size: int, device: torch.device,
                 checkpointing: bool, peak_override: float = 0.0) -> None:
        self.model, self.sampler, self.counts, self.world = model, sampler, counts, world_size
        self.device, self.checkpointing, self.peak_override = device, checkpointing, peak_override

    @functools.cached_property
    def flop_model(self) -> FlopModel:
        return FlopModel.from_model(self.model, self.checkpointing)

    @functools.cached_property
    def peak(self) -> float | None:
        """One device's bf16 peak: ``train.peak_tflops`` or the GPU's table entry; None on a CPU."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        found = peak_tflops(name, self.peak_override)
        if found is None:
            logger.warning("no bf16 peak known for %r: set train.peak_tflops to log train/mfu", name)
        return found

    def scalars(self, step: int, seconds: float) -> dict[str, float]:
        """Real tokens/s, padding ratio, model TFLOP/s per device and MFU of step ``step``
        (0-based), over every rank's micro-batches."""
        micro = [m for rank in range(self.world) for m in self.sampler.micro_batches(step, rank)]
        tokens, slots, square, targets = self.counts.shape(micro)
        flops = self.flop_model.step_flops(tokens, square, len(micro), logits=targets)
        return throughput_scalars(flops, tokens, slots, seconds, self.world, self.peak)
