"""Per-token log-probabilities of the next token, shift-consistent with their masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from post_training.data_sft.tokenize import IGNORE_INDEX


def shift_labels(tensor: torch.Tensor, fill: int) -> torch.Tensor:
    """Align a per-token tensor with next-token predictions: position t holds token t+1's value."""
    return F.pad(tensor[:, 1:], (0, 1), value=fill)


def next_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t+1] | tokens <= t) at position t, 0 where the label is ignored or absent.

    ``logits``: [B, T, V]; ``labels``: [B, T] with -100 on ignored tokens. Returns [B, T] fp32.
    """
    targets = shift_labels(labels, IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -nll.view_as(targets)
