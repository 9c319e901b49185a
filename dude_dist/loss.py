"""The one next-token loss of dude_dist: summed over labelled tokens, divided by the caller.

Training divides the sum by the labelled tokens of the *global* batch (every rank, every
micro-batch), so the gradient does not depend on how a batch is split over ranks and
accumulation steps; held-out loss divides by the held-out set's labelled tokens.

Everything that needs host arithmetic (how many targets a batch has, where its first
label is) is read from the batch *before* it moves to the device (:func:`loss_inputs`),
so the step never waits on the GPU for a count.

With ``logits_to_keep`` the model computes logits only where the loss needs them: prompt
positions carry no loss, and the LM head over a large vocabulary is a sizeable share of a
step's work and memory (SmolLM2-135M: a fifth of the frozen weights each token meets;
Qwen2.5-32B at 2048 tokens: 4 GiB of logits, their float32 copy and its gradient). When the
positions at which some row of the batch has a label run unbroken from the first to the
end (most padded batches) the model is given their count and slices; when they leave gaps
(a packed row: every later sample's prompt), it is given the positions themselves, a 1-D
tensor counted on the host (transformers >= 4.49 takes one), and gathers just those.

Packed rows (:func:`dude_dist.data.pack_dataset`) reach the model with ``position_ids``
that restart at every sample and without ``attention_mask``, plus the samples' cumulative
lengths for variable-length attention (:mod:`dude_dist.attention`, flash attention): each
sample attends only to itself, so the summed loss is the padded batch's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dude_dist.attention import packed_lengths_on_host

IGNORE_INDEX = -100


KEEP_LAST = "last"
KEEP_POSITIONS = "positions"


def logits_to_keep_support(model: Any) -> str:
    """How ``model.forward`` takes ``logits_to_keep``: :data:`KEEP_POSITIONS` (a count of
    last positions or a 1-D tensor of positions: transformers' causal LMs), :data:`KEEP_LAST`
    (a count only: the parameter's annotation names no tensor), or ``""`` (not at all)."""
    param = inspect.signature(model.forward).parameters.get("logits_to_keep")
    if param is None:
        return ""
    return KEEP_POSITIONS if "Tensor" in str(param.annotation) else KEEP_LAST


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers' causal LMs do)."""
    return bool(logits_to_keep_support(model))


def _keep_mode(keep_logits: bool | str | None) -> str:
    if keep_logits is True:
        return KEEP_POSITIONS
    if not keep_logits:
        return ""
    if keep_logits not in (KEEP_LAST, KEEP_POSITIONS):
        raise ValueError(f"keep_logits must be a bool, {KEEP_LAST!r} or {KEEP_POSITIONS!r}, got {keep_logits!r}")
    return keep_logits


@dataclass(frozen=True)
class LossInputs:
    """One batch ready for :func:`summed_loss`.

    Attributes:
        tensors: ``input_ids``, ``labels`` ``[batch, seq]`` on the device, with
            ``attention_mask`` (padded samples) or ``position_ids`` (packed rows).
        targets: number of labelled next-token targets (host integer).
        tokens: number of real (non-padding) tokens (host integer).
        first: first labelled target position (``logits_to_keep`` starts there), or None to
            compute logits everywhere.
        positions: the labelled target positions ``[k]`` on the device when they leave gaps
            between ``first`` and the end (a packed row's prompts): logits are computed at
            these positions only. None otherwise.
        forward_kwargs: further keyword arguments of the model call (packed rows:
            ``use_cache=False`` and, but for ``eager``, the cumulative sequence lengths).
    """

    tensors: dict[str, torch.Tensor]
    targets: int
    tokens: int
    first: int | None
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    positions: torch.Tensor | None = None


def varlen_kwargs(position_ids: torch.Tensor, device: torch.device | str | None = None) -> dict[str, Any]:
    """Variable-length attention arguments for packed rows, computed on the host.

    The rows ``[batch, seq]`` are read as one flattened sequence of ``batch * seq`` tokens
    cut wherever a position restarts at 0 (each sample, and the padding after the last one),
    so the attention never needs a device-to-host read to learn the lengths.

    Args:
        position_ids: from :func:`dude_dist.data.collate_batch`, on the host.
        device: where ``cu_seq_lens_*`` go: the GPU for flash attention's kernels, None to
            keep them on the host (:func:`dude_dist.attention.packed_sdpa_forward` slices there).
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    cu_seq_lens = cu_seq_lens.to(device, non_blocking=True) if device is not None else cu_seq_lens
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


def loss_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None,
                keep_logits: bool | str = True, attn_implementation: str = "sdpa") -> LossInputs:
    """Count targets and tokens and find the first label on the host, then move ``batch``.

    Args:
        batch: from :func:`dude_dist.data.collate_batch` (host tensors; a device batch works
            too, at the price of a sync).
        device: where the model runs (None: leave the tensors where they are).
        keep_logits: compute logits only where there are labels: :data:`KEEP_POSITIONS`
            (or True: transformers' causal LMs) at the labelled positions, :data:`KEEP_LAST`
            from the first labelled position on (a model whose ``logits_to_keep`` is a count
            only, :func:`logits_to_keep_support`), False everywhere.
        attn_implementation: ``model.attn_implementation``; packed rows carry the
            cumulative sequence lengths (:func:`varlen_kwargs`) on the host for ``sdpa``, on
            ``device`` for ``flash_attention_2``, and none for ``eager`` (transformers'
            block-diagonal mask).
    """
    keep = _keep_mode(keep_logits)
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    first = positions = None
    if keep:
        labelled = targets.any(0).nonzero().reshape(-1)
        first = int(labelled[0]) if len(labelled) else targets.shape[1] - 1
        if keep == KEEP_POSITIONS and 1 < len(labelled) < targets.shape[1] - first:  # gaps: gather
            positions = labelled.to(device, non_blocking=True) if device is not None else labelled
    packed = "position_ids" in batch
    # Packed rows go to the model with position_ids and no attention_mask: that is what makes
    # transformers build per-sample attention. The mask stays on the host to count tokens.
    keys = ("input_ids", "position_ids", "labels") if packed else ("input_ids", "attention_mask", "labels")
    moved = {k: batch[k].to(device, non_blocking=True) if device is not None else batch[k] for k in keys}
    forward_kwargs: dict[str, Any] = {}
    if packed:
        forward_kwargs["use_cache"] = False  # with a cache transformers does not look for packed sequences
        if attn_implementation != "eager":
            on_host = packed_lengths_on_host(attn_implementation)
            forward_kwargs.update(varlen_kwargs(batch["position_ids"], None if on_host else device))
    return LossInputs(tensors=moved, targets=int(targets.sum()), tokens=int(batch["attention_mask"].sum()),
                      first=first, forward_kwargs=forward_kwargs, positions=positions)


LOSS_CHUNK_ELEMENTS = 1 << 24  # float32 logits per chunk of the loss (64 MiB; 110 rows at a 152k vocabulary)


class _SummedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``logits [T, V]`` (any float dtype) against ``labels [T]``,
    in float32 (float64 for float64 logits) a chunk of rows at a time.

    ``F.cross_entropy(logits.float())`` keeps a float32 copy of every logit and its float32
    log-softmax, and makes a float32 gradient before casting it back: 14 bytes per bf16
    logit at the peak (4 GiB for Qwen2.5-32B at 2048 tokens). Here only the logits
    themselves are kept, with each row's maximum and log-sum-exp; the backward rebuilds the
    softmax a chunk at a time and writes the gradient in the logits' dtype: 4 bytes per
    bf16 logit plus one float32 chunk (:data:`LOSS_CHUNK_ELEMENTS`). As in ``log_softmax``, every row is shifted by
    its maximum before anything is rounded at the logits' magnitude, so a confident
    prediction's small loss keeps its precision.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        picked = labels.masked_fill(~valid, 0)  # any other negative label still fails in gather
        work = torch.promote_types(logits.dtype, torch.float32)
        top = torch.empty(logits.shape[0], dtype=work, device=logits.device)  # row maxima
        lse = torch.empty_like(top)  # log-sum-exp of the shifted row
        total = torch.zeros((), dtype=work, device=logits.device)
        buf = torch.empty((min(rows, logits.shape[0]), logits.shape[1]), dtype=work, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            chunk = logits[start:end]
            top[start:end] = chunk.amax(dim=-1)  # exact in the logits' dtype
            shifted = _shifted(chunk, top[start:end], buf)
            target = shifted.gather(1, picked[start:end, None]).squeeze(1)
            lse[start:end] = shifted.exp_().sum(dim=-1).log_()
            total += (lse[start:end] - target).masked_fill(~valid[start:end], 0.0).sum()
        ctx.save_for_backward(logits, picked, valid, top, lse)
        ctx.rows = rows
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, picked, valid, top, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        # softmax = exp(logit - top) * exp(-lse): each row is shifted by its maximum alone, so a
        # confident target's p - 1 keeps its precision (rounding top + lse first would not)
        weight = valid.to(lse.dtype) * grad  # the upstream gradient of each row's loss
        factor = weight * torch.exp(-lse)
        minus = (-weight)[:, None]
        buf = torch.empty((min(ctx.rows, logits.shape[0]), logits.shape[1]), dtype=lse.dtype, device=logits.device)
        for start in range(0, logits.shape[0], ctx.rows):
            end = start + ctx.rows
            chunk = logits[start:end]
            soft = _shifted(chunk, top[start:end], buf).exp_()
            index = picked[start:end, None]
            if out.dtype == soft.dtype:  # one pass, then the targets in place
                torch.mul(soft, factor[start:end, None], out=out[start:end]).scatter_add_(1, index, minus[start:end])
            else:  # the targets in the work dtype before the cast (a multiply into another dtype is slower)
                out[start:end] = soft.mul_(factor[start:end, None]).scatter_add_(1, index, minus[start:end])
        return out, None, None


def _shifted(chunk: torch.Tensor, shift: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``chunk - shift[:, None]`` in ``buf``'s dtype, written into the first rows of ``buf``:
    one pass in the same dtype; a cast copy first otherwise (a subtraction into another
    dtype takes a slower path)."""
    out = buf[: chunk.shape[0]]
    if chunk.dtype == buf.dtype:
        return torch.sub(chunk, shift[:, None], out=out)
    return out.copy_(chunk).sub_(shift[:, None])


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = LOSS_CHUNK_ELEMENTS
                         ) -> torch.Tensor:
    """Sum of the next-token losses of ``logits [T, V]`` at ``labels [T]`` (-100: none),
    what ``F.cross_entropy(logits.float(), labels, reduction="sum")`` gives (in float64 for
    float64 logits), keeping only the logits for the backward (:class:`_SummedCrossEntropy`).

    Args:
        chunk_elements: float32 logits worked on at once (at least one row).
    """
    rows = max(1, chunk_elements // max(logits.shape[-1], 1))
    return _SummedCrossEntropy.apply(logits, labels, rows)


def summed_loss(forward: Any, inputs: LossInputs) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the labelled targets of ``inputs``.

    Args:
        forward: the model or DeepSpeed engine (called with ``input_ids`` and either
            ``attention_mask`` or, for packed rows, ``position_ids``).
    """
    batch = inputs.tensors
    # the target of each position's logit: the next token's label; the last position has none
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    kwargs: dict = dict(inputs.forward_kwargs)
    if inputs.positions is not None:
        kwargs["logits_to_keep"] = inputs.positions  # logits[:, j] is position positions[j]'s
        targets = targets.index_select(1, inputs.positions)
    elif inputs.first is not None:
        kwargs["logits_to_keep"] = targets.shape[1] - inputs.first  # positions first..end
        targets = targets[:, inputs.first :]
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    logits = forward(input_ids=batch["input_ids"], **kwargs).logits
    return summed_cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_loss_sum(forward: Any, batch: dict[str, torch.Tensor], keep_logits: bool | str = True
                   ) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a batch (wherever it lives) and its number of labelled targets."""
    inputs = loss_inputs(batch, keep_logits=keep_logits)
    return summed_loss(forward, inputs), inputs.targets
