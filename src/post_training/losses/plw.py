"""Prompt-loss-weighted SFT (PLW) and its length-normalised variant (LN-PLW).

Ref: Huerta-Enochian & Ko, "Instruction Fine-Tuning: Does Prompt Loss Matter?" (arXiv 2401.13586).

All tensors are [B, T] and aligned to the *predicted* token: position t holds log p(x_{t+1} | x_<=t)
and the masks of token t+1. Normalisers are counts over the whole gradient-accumulation window on
all data-parallel ranks (``num_prompt_tokens``, ``num_completion_tokens``, ``num_sequences``), so
that the losses of k micro-batches add up to the loss of one batch of all their examples.
"""

from __future__ import annotations

import torch


def _safe_div(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def plw_loss(
    token_logps: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_loss_weight: float,
    num_prompt_tokens: float | torch.Tensor,
    num_completion_tokens: float | torch.Tensor,
    num_sequences: float | torch.Tensor,
    sequence_level: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PLW: per-token weights ``w = plw·prompt + completion`` on the cross-entropy ``-log p``.

    Token level:    ``Σ w·CE / Σ w`` with ``Σ w = plw·num_prompt_tokens + num_completion_tokens``.
    Sequence level: ``(1/num_sequences) Σ_seq (Σ_t w·CE / Σ_t w)`` (each sequence's weighted mean).
    ``prompt_loss_weight=0`` is completion-only SFT; ``1`` is the loss on every token.
    """
    ce = -token_logps
    weights = prompt_loss_weight * prompt_mask.to(ce.dtype) + completion_mask.to(ce.dtype)
    if sequence_level:
        per_seq = _safe_div((weights * ce).sum(-1), weights.sum(-1))
        loss = _safe_div(per_seq.sum(), num_sequences)
    else:
        total = prompt_loss_weight * torch.as_tensor(num_prompt_tokens, dtype=ce.dtype)
        loss = _safe_div((weights * ce).sum(), total + num_completion_tokens)
    return loss, _ce_metrics(ce, prompt_mask, completion_mask)


def ln_plw_loss(
    token_logps: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_loss_weight: float,
    num_prompt_tokens: float | torch.Tensor,
    num_completion_tokens: float | torch.Tensor,
    num_sequences: float | torch.Tensor,
    sequence_level: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LN-PLW: ``plw · mean prompt CE + mean completion CE``, each mean over its own tokens.

    Token level: the means are over all prompt (resp. completion) tokens of the window.
    Sequence level: the same per sequence, then averaged over ``num_sequences``.
    """
    ce = -token_logps
    p, c = prompt_mask.to(ce.dtype), completion_mask.to(ce.dtype)
    if sequence_level:
        per_seq = prompt_loss_weight * _safe_div((p * ce).sum(-1), p.sum(-1)) + _safe_div(
            (c * ce).sum(-1), c.sum(-1)
        )
        loss = _safe_div(per_seq.sum(), num_sequences)
    else:
        loss = prompt_loss_weight * _safe_div((p * ce).sum(), num_prompt_tokens) + _safe_div(
            (c * ce).sum(), num_completion_tokens
        )
    return loss, _ce_metrics(ce, prompt_mask, completion_mask)


def _ce_metrics(
    ce: torch.Tensor, prompt_mask: torch.Tensor, completion_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums for logging (divided by the window's counts by the trainer)."""
    p, c = prompt_mask.to(ce.dtype), completion_mask.to(ce.dtype)
    return {
        "prompt_nll_sum": (p * ce).sum().detach(),
        "completion_nll_sum": (c * ce).sum().detach(),
    }
