"""Deterministic batch order: a pure function of the seed and the epoch.

Because the order of every epoch can be recomputed from ``(seed, epoch)``, resuming at step ``s``
needs no sampler state: it takes global batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_BY_LENGTH_MEGABATCHES = 32


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    megabatches: int = GROUP_BY_LENGTH_MEGABATCHES,
) -> list[list[int]]:
    """Global batches (lists of example indices) of one epoch; the incomplete tail is dropped.

    A permutation seeded by ``seed + epoch`` is cut into batches of ``batch_size``. With
    ``group_by_length``, it is first cut into mega-batches of ``megabatches`` batches, each
    sorted by decreasing length, so that a batch holds examples of similar length (less
    padding); the batch order is then shuffled with the same generator.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    steps = len(lengths) // batch_size
    order = torch.randperm(len(lengths), generator=generator).tolist()[: steps * batch_size]
    if group_by_length:
        mega = batch_size * megabatches
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
