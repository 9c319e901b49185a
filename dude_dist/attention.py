"""Attention that runs each packed sample on its own: PyTorch SDPA over sample boundaries.

    python -c "from dude_dist.attention import model_attn_implementation; print(model_attn_implementation('sdpa'))"

transformers confines packed samples (``position_ids`` restarting at 0, no
``attention_mask``) for ``sdpa`` with a block-diagonal mask over the whole row: every token
still meets every key of the row, masked, so a row of ``max_seq_len`` tokens costs
``max_seq_len**2`` per head and layer whatever its samples. Only flash attention's varlen
kernels cut the work to ``sum n_i**2``, and they need a CUDA GPU and the ``flash_attn``
package.

``model.attn_implementation: sdpa`` therefore loads the model with
:data:`PACKED_SDPA`, registered with transformers' ``AttentionInterface``: given the
cumulative sequence lengths of a packed batch (``cu_seq_lens_q``, a host tensor from
:func:`dude_dist.loss.varlen_kwargs`) it calls ``scaled_dot_product_attention`` once per
sample with ``is_causal=True``, which costs what the samples cost, on any device. Anything
else (padded batches, generation with a left-padding mask, a KV cache) goes to
transformers' own ``sdpa`` unchanged, and masks are built as for ``sdpa``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_SDPA = "dude_packed_sdpa"


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [batch, heads, seq, dim]``, ``key``
    and ``value [batch, kv_heads, seq, dim]``; returns ``[batch, seq, heads, dim]``.

    With ``cu_seq_lens_q`` on the host, the ``batch * seq`` tokens are one flat sequence cut
    at those offsets (samples, and the padding after a row's last sample), each attended
    causally on its own; the mask transformers built for the row is not needed.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or cu.device.type != "cpu" or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, seq, dim = query.shape
    groups = heads // key.shape[1]
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value)]  # [T, h, d]
    outputs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in flat)  # [1, h, n, d]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        outputs.append(out.squeeze(0).transpose(0, 1))  # [n, heads, d]
    return torch.cat(outputs).view(batch, seq, heads, dim), None


def register() -> None:
    """Make :data:`PACKED_SDPA` a name ``from_pretrained(attn_implementation=...)`` accepts,
    with ``sdpa``'s mask builder (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def model_attn_implementation(name: str) -> str:
    """The implementation a model is loaded with for ``model.attn_implementation = name``:
    :data:`PACKED_SDPA` for ``sdpa`` (registered here), the name itself otherwise."""
    if name == "sdpa":
        register()
        return PACKED_SDPA
    return name


def packed_lengths_on_host(name: str) -> bool:
    """Whether packed batches give the attention their cumulative lengths as a host tensor
    (:data:`PACKED_SDPA` slices on the host) rather than on the device (flash attention)."""
    return not name.startswith("flash")
