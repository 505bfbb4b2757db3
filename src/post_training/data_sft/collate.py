"""Right-padded batches of tokenized SFT examples (unpacked or packed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from post_training.losses.constants import IGNORE_INDEX

PAD_VALUES = {"input_ids": None, "labels": IGNORE_INDEX, "prompt_mask": 0, "completion_mask": 0}


def pad_collate(
    examples: Sequence[dict[str, Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest example; adds ``attention_mask`` (1 on real tokens). Per-example
    scalars (e.g. a pair's precomputed reference log-probs) are stacked as [B] tensors.

    Packed examples carry ``position_ids``; their padding gets positions ``0, 1, ...`` so it
    forms a document of its own that no real token attends to.
    """
    length = max(len(e["input_ids"]) for e in examples)
    size = len(examples)
    batch: dict[str, torch.Tensor] = {}
    keys = dict(PAD_VALUES)
    if "position_ids" in examples[0]:
        keys["position_ids"] = None
    for key, pad in keys.items():
        value = pad_token_id if pad is None else pad
        out = np.full((size, length), value, dtype=np.int64)
        for row, example in enumerate(examples):
            values = example[key]
            out[row, : len(values)] = values
            if key == "position_ids":
                out[row, len(values) :] = np.arange(length - len(values))
        batch[key] = torch.from_numpy(out)
    for key in examples[0]:
        if key not in keys and np.ndim(examples[0][key]) == 0:  # per-example scalars
            batch[key] = torch.tensor(np.array([e[key] for e in examples]))
    attention = np.zeros((size, length), dtype=np.int64)
    for row, example in enumerate(examples):
        attention[row, : len(example["input_ids"])] = 1
    batch["attention_mask"] = torch.from_numpy(attention)
    return batch
