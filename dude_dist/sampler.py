"""Which samples each rank sees at each optimizer step.

The order depends only on (seed, epoch), never on the world size: step ``s`` uses the
``s``-th block of ``global_batch_size`` indices of the epoch's permutation, and rank ``k``
takes the ``k``-th contiguous slice of it, cut into ``grad_accum`` micro-batches. So a
1-process run and a P-process run with the same global batch see the same samples per
step, ranks never overlap, and the step number alone is the data position a checkpoint
needs to resume at the exact next sample.

With ``lengths`` (``data.group_by_length``) the epoch's permutation is cut into windows of
:data:`GROUP_WINDOW` global batches; each window is sorted by length (ties keep their random
order) and cut into global batches, which are then shuffled within the window. A global
batch then holds samples of similar length, so the micro-batches cut from it are padded
little, while which samples meet, and in which order the batches come, stays seeded and
independent of the world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dude_dist.config import BatchLayout
from dude_dist.errors import DataError

GROUP_WINDOW = 64  # global batches sorted by length together (data.group_by_length)


class StepSampler:
    """Deterministic, world-size independent batches for optimizer steps.

    Args:
        num_samples: size of the training set.
        layout: batch arithmetic (micro, accum, world).
        seed: shuffle seed; epoch ``e`` uses ``seed + e``.
        lengths: tokens of each sample; given, batches are grouped by length.

    Raises:
        DataError: fewer samples than one global batch.
    """

    def __init__(self, num_samples: int, layout: BatchLayout, seed: int,
                 lengths: Sequence[int] | None = None) -> None:
        if num_samples < layout.global_batch_size:
            raise DataError(
                f"{num_samples} training sample(s) cannot fill one global batch of {layout.global_batch_size} "
                f"(train.micro_batch_size {layout.micro_batch_size} x accum {layout.grad_accum} x world size "
                f"{layout.world_size}): give data.sources (or data.limit) at least {layout.global_batch_size} "
                f"usable samples, or lower train.global_batch_size / train.micro_batch_size"
            )
        self.num_samples = num_samples
        self.layout = layout
        self.seed = seed
        self.steps_per_epoch = num_samples // layout.global_batch_size
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths is not None and len(self.lengths) != num_samples:
            raise ValueError(f"{len(self.lengths)} lengths for {num_samples} samples")
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=gen)
            if self.lengths is not None:
                self._perm = self._group_by_length(self._perm, gen)
            self._epoch = epoch
        return self._perm

    def _group_by_length(self, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        size = self.layout.global_batch_size
        used = self.steps_per_epoch * size
        window = GROUP_WINDOW * size
        grouped = []
        for start in range(0, used, window):
            part = perm[start : min(start + window, used)]
            part = part[torch.argsort(self.lengths[part], descending=True, stable=True)].view(-1, size)
            grouped.append(part[torch.randperm(len(part), generator=gen)].reshape(-1))
        return torch.cat(grouped + [perm[used:]])

    def global_batch(self, step: int) -> list[int]:
        """All indices of optimizer step ``step`` (0-based), over every rank."""
        epoch, within = divmod(step, self.steps_per_epoch)
        size = self.layout.global_batch_size
        return self._permutation(epoch)[within * size : (within + 1) * size].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Rank ``rank``'s ``grad_accum`` micro-batches of step ``step``."""
        per_rank = self.layout.per_rank
        mine = self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
        micro = self.layout.micro_batch_size
        return [mine[i : i + micro] for i in range(0, per_rank, micro)]
