"""Padding-free packing: best-fit-decreasing bins of ``max_seq_length`` tokens.

A packed example concatenates whole documents (none is split, duplicated or lost) and carries
``position_ids`` that restart at 0 for every document. With ``position_ids`` and no attention
mask, transformers keeps attention inside each document: flash-attention's varlen kernels on GPU,
a per-document block-causal mask on SDPA / eager (``masking_utils.find_packed_sequence_indices``).
The first token of every document gets no loss: it would be "predicted" by the previous
document's last token (in an unpacked forward it is never predicted either).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from post_training.losses.constants import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices; each item goes to the fullest bin it fits in (items by decreasing
    length, ties by index, so the result is deterministic)."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} items longer than the bin capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Remaining capacities present (sorted) -> stack of bins with that remaining capacity.
    free_values: list[int] = []
    free_bins: dict[int, list[int]] = {}
    for item in order:
        size = lengths[item]
        pos = bisect.bisect_left(free_values, size)
        if pos == len(free_values):
            b = len(bins)
            bins.append([item])
            remaining = capacity - size
        else:
            value = free_values[pos]
            stack = free_bins[value]
            b = stack.pop()
            if not stack:
                del free_bins[value]
                free_values.pop(pos)
            bins[b].append(item)
            remaining = value - size
        if remaining > 0:
            if remaining not in free_bins:
                bisect.insort(free_values, remaining)
                free_bins[remaining] = []
            free_bins[remaining].append(b)
    return [sorted(b) for b in bins]


def pack_examples(
    examples: Sequence[dict[str, np.ndarray]], capacity: int
) -> tuple[list[dict[str, np.ndarray]], list[list[int]]]:
    """Packed examples (with ``position_ids``) and the example indices in each. An example that
    carries ``position_ids`` already (a preference pair: two documents) keeps them."""
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], capacity)
    packed = []
    for members in bins:
        docs = [examples[i] for i in members]
        out = {
            key: np.concatenate([d[key] for d in docs])
            for key in ("input_ids", "labels", "prompt_mask", "completion_mask")
        }
        out["position_ids"] = np.concatenate(
            [d.get("position_ids", np.arange(len(d["input_ids"]))) for d in docs]
        )
        starts = out["position_ids"] == 0
        out["labels"][starts] = IGNORE_INDEX
        out["prompt_mask"][starts] = 0
        out["completion_mask"][starts] = 0
        packed.append(out)
    return packed, bins


def packing_efficiency(packed: Sequence[dict[str, np.ndarray]], capacity: int) -> float:
    """Fraction of the bins' capacity holding real tokens."""
    if not packed:
        return 0.0
    return sum(len(p["input_ids"]) for p in packed) / (capacity * len(packed))
