"""Plain SFT: negative log-likelihood of completion tokens."""

from __future__ import annotations

import torch


def sft_loss(
    token_logps: torch.Tensor, loss_mask: torch.Tensor, num_loss_tokens: float | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level mean NLL: ``-Σ mask·logp / num_loss_tokens``.

    ``token_logps`` and ``loss_mask`` are [B, T] and aligned to the predicted token (already
    shifted). ``num_loss_tokens`` is the number of loss tokens in the whole gradient-accumulation
    window on all data-parallel ranks, so that summing micro-batch losses gives the exact mean of
    one big batch. Returns the loss and metrics (``nll_sum``, ``num_tokens`` of this micro-batch).
    """
    mask = loss_mask.to(token_logps.dtype)
    nll_sum = -(token_logps * mask).sum()
    loss = nll_sum / num_loss_tokens
    return loss, {"nll_sum": nll_sum.detach(), "num_tokens": mask.sum().detach()}
