"""Right-padded batches of tokenized SFT examples."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from post_training.data_sft.tokenize import IGNORE_INDEX

PAD_VALUES = {"input_ids": None, "labels": IGNORE_INDEX, "prompt_mask": 0, "completion_mask": 0}


def pad_collate(
    examples: Sequence[dict[str, list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest example; adds ``attention_mask``."""
    length = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key, pad in PAD_VALUES.items():
        value = pad_token_id if pad is None else pad
        batch[key] = torch.tensor(
            [e[key] + [value] * (length - len(e[key])) for e in examples], dtype=torch.long
        )
    batch["attention_mask"] = torch.tensor(
        [[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in examples],
        dtype=torch.long,
    )
    return batch
