"""Micro-batches of tokenized pairs: one pair per padded row, or several pairs per packed row.

A tokenized pair (:mod:`post_training.data_preference.encode`) is a row of two documents, chosen
then rejected, ``position_ids`` restarting at each. Packed (``training_args.packing=true``), the
pairs of a micro-batch go into rows of ``capacity`` tokens by best-fit decreasing on each pair's
total length, a pair never split (its chosen and rejected side stay in one row, documents 2p and
2p+1 of the row for its p-th pair). With ``position_ids`` and no attention mask, transformers
keeps attention inside each document (see ``data_sft/packing.py``), so a packed pair is scored as
in its own row.

A packed batch carries ``pairs_per_row`` [R]; its per-pair columns (``ref_chosen_logps``,
``kto_label``, ``margin``, ``row_index``, ...) are [N] in row-major pair order, the order in
which :func:`per_pair` flattens per-slot statistics. An unpacked batch has one slot per row and
[B] columns, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from post_training.data_sft.collate import pad_collate
from post_training.data_sft.packing import pack_examples

TOKEN_KEYS = ("input_ids", "labels", "prompt_mask", "completion_mask", "position_ids")


def pair_collate(
    pairs: Sequence[dict[str, np.ndarray]], pad_token_id: int, capacity: int | None = None
) -> dict[str, torch.Tensor]:
    """The batch of ``pairs``: one per row (``capacity`` None) or packed into rows of at most
    ``capacity`` tokens (a pair longer than that gets a row of its own)."""
    if capacity is None:
        return pad_collate(pairs, pad_token_id)
    lengths = [len(p["input_ids"]) for p in pairs]
    rows, bins = pack_examples(pairs, max(capacity, *lengths))
    order = [i for members in bins for i in members]
    batch = pad_collate(rows, pad_token_id)
    for key, value in pairs[0].items():
        if key not in TOKEN_KEYS and np.ndim(value) == 0:  # per-pair columns, in slot order
            batch[key] = torch.tensor(np.array([pairs[i][key] for i in order]))
    batch["pairs_per_row"] = torch.tensor([len(m) for m in bins], dtype=torch.int64)
    return batch


def pair_slots(batch: dict[str, torch.Tensor]) -> int:
    """Pair slots per row: the most pairs a row of the batch holds (1 unpacked)."""
    counts = batch.get("pairs_per_row")
    return 1 if counts is None else int(counts.max())


def per_pair(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-slot values [R, P, ...] as per-pair values: [N, ...] in the order of the batch's
    per-pair columns when packed, [B, ...] (slot 0 of every row) when not."""
    counts = batch.get("pairs_per_row")
    if counts is None:
        return values[:, 0]
    slots = torch.arange(values.shape[1], device=values.device)
    return values[slots.unsqueeze(0) < counts.to(values.device).unsqueeze(-1)]


def real_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1.0 for each pair of the batch that is real: every pair of a packed batch, the rows with
    tokens of an unpacked one (an empty row stands in for a missing pair)."""
    if "pairs_per_row" in batch:
        n = int(batch["pairs_per_row"].sum())
        return torch.ones(n, device=batch["input_ids"].device)
    return (batch["attention_mask"].sum(-1) > 0).float()


def document_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[R, T]: each token's document in its row (2p chosen, 2p+1 rejected side of the row's
    p-th pair; the padding after the last pair is a document of its own)."""
    return (batch["position_ids"] == 0).cumsum(-1) - 1
