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


def per_sequence(values: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``values`` [B, T] per sequence: per row, or per packed document when
    ``sequence_ids`` [B, T] gives each position's document id (unique in the batch, ≥ 0; -1 for
    none). Rows / ids without any position simply sum to 0."""
    if sequence_ids is None:
        return values.sum(-1)
    ids = sequence_ids.reshape(-1)
    flat = values.reshape(-1)
    keep = ids >= 0
    out = flat.new_zeros(int(sequence_ids.numel()))
    return out.index_add(0, ids[keep], flat[keep])


def plw_loss(
    token_logps: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_loss_weight: float,
    num_prompt_tokens: float | torch.Tensor,
    num_completion_tokens: float | torch.Tensor,
    num_sequences: float | torch.Tensor,
    sequence_level: bool = False,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PLW: per-token weights ``w = plw·prompt + completion`` on the cross-entropy ``-log p``.

    Token level:    ``Σ w·CE / Σ w`` with ``Σ w = plw·num_prompt_tokens + num_completion_tokens``.
    Sequence level: ``(1/num_sequences) Σ_seq (Σ_t w·CE / Σ_t w)`` (each sequence's weighted mean).
    ``prompt_loss_weight=0`` is completion-only SFT; ``1`` is the loss on every token.
    ``sequence_ids`` (packed batches): see :func:`per_sequence`.
    """
    ce = -token_logps
    weights = prompt_loss_weight * prompt_mask.to(ce.dtype) + completion_mask.to(ce.dtype)
    if sequence_level:
        per_seq = _safe_div(
            per_sequence(weights * ce, sequence_ids), per_sequence(weights, sequence_ids)
        )
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
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LN-PLW: ``plw · mean prompt CE + mean completion CE``, each mean over its own tokens.

    Token level: the means are over all prompt (resp. completion) tokens of the window.
    Sequence level: the same per sequence, then averaged over ``num_sequences``.
    ``sequence_ids`` (packed batches): see :func:`per_sequence`.
    """
    ce = -token_logps
    p, c = prompt_mask.to(ce.dtype), completion_mask.to(ce.dtype)
    if sequence_level:
        prompt_mean = _safe_div(per_sequence(p * ce, sequence_ids), per_sequence(p, sequence_ids))
        completion_mean = _safe_div(
            per_sequence(c * ce, sequence_ids), per_sequence(c, sequence_ids)
        )
        per_seq = prompt_loss_weight * prompt_mean + completion_mean
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
