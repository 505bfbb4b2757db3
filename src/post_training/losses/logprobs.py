"""Per-token log-probabilities of the next token, shift-consistent with their masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from post_training.losses.constants import IGNORE_INDEX


def shift_labels(tensor: torch.Tensor, fill: int) -> torch.Tensor:
    """Align a per-token tensor with next-token predictions: position t holds token t+1's value."""
    return F.pad(tensor[:, 1:], (0, 1), value=fill)


def next_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t+1] | tokens <= t) at position t, 0 where the label is ignored or absent.

    ``logits``: [B, T, V]; ``labels``: [B, T] with -100 on ignored tokens. Returns [B, T] fp32.
    """
    return next_token_logps_and_lse(logits, labels)[0]


def next_token_logps_and_lse(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aligned ``(logps, lse, correct)``: target log-prob (0 where ignored), logsumexp of the
    logits (the soft value V used by IRL), and whether the argmax is the target (0/1, fp32)."""
    targets = shift_labels(labels, IGNORE_INDEX)
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    target_logit = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logps = torch.where(valid, target_logit - lse, torch.zeros_like(lse))
    correct = ((logits.argmax(-1) == safe) & valid).float()
    return logps, lse, correct
