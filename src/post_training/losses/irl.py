"""Inverse-RL SFT: IQLearn-style temporal-difference-regularised maximum likelihood.

Ref: Wulfmeier et al. 2024, "Imitating Language via Scalable Inverse Reinforcement Learning"
(arXiv 2409.01369). The logits are read as soft Q-values, ``Q(s_t, a) = logit_t[a]``, with the
soft value ``V(s) = logsumexp_a Q(s, a)``. The implicit reward of the demonstrated action is
``r_t = Q(s_t, a_t) − γ·V(s_{t+1})``, with ``V = 0`` at the terminal state (after the last real
token of each sequence — not at the end of a padded batch row). The loss adds
``λ·r_t²`` on completion tokens to the base (PLW) negative log-likelihood; ``λ = 0`` is exactly
the base loss.

Tensors are [B, T], aligned to the predicted token: ``token_logps[t] = log p(x_{t+1} | x_<=t)``,
``lse[t] = logsumexp(logits_t)`` so ``Q(s_t, a_t) = token_logps[t] + lse[t]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from post_training.losses.plw import _safe_div, per_sequence, plw_loss


def next_state_values(lse: torch.Tensor, target_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``γ·V(s_{t+1})`` per position; 0 where ``s_{t+1}`` is terminal or padding.

    ``target_mask[t]`` is 1 where position t predicts a real token. State ``s_{t+1}`` is
    non-terminal exactly when position t+1 itself predicts a real token.
    """
    next_lse = F.pad(lse[:, 1:], (0, 1))
    next_real = F.pad(target_mask[:, 1:], (0, 1)).to(lse.dtype)
    return gamma * next_lse * next_real


def irl_loss(
    token_logps: torch.Tensor,
    lse: torch.Tensor,
    target_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    num_prompt_tokens: float | torch.Tensor,
    num_completion_tokens: float | torch.Tensor,
    num_sequences: float | torch.Tensor,
    lambda_td: float = 0.5,
    gamma: float = 1.0,
    prompt_loss_weight: float = 0.0,
    sequence_level: bool = False,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Base PLW loss + ``λ``·(mean over completion tokens of ``(Q − γ·V')²``).

    The TD term is aggregated like the completion NLL: over the window's completion tokens
    (token level) or per sequence then over ``num_sequences`` (sequence level).
    """
    base, metrics = plw_loss(
        token_logps,
        prompt_mask,
        completion_mask,
        prompt_loss_weight,
        num_prompt_tokens,
        num_completion_tokens,
        num_sequences,
        sequence_level,
        sequence_ids,
    )
    c = completion_mask.to(token_logps.dtype)
    q = token_logps + lse
    reward = q - next_state_values(lse, target_mask, gamma)
    td = reward.pow(2) * c
    if sequence_level:
        per_seq = _safe_div(per_sequence(td, sequence_ids), per_sequence(c, sequence_ids))
        td_term = _safe_div(per_seq.sum(), num_sequences)
    else:
        td_term = _safe_div(td.sum(), num_completion_tokens)
    loss = base + lambda_td * td_term
    metrics = {
        **metrics,
        "td_sum": td.sum().detach(),
        "reward_sum": (reward * c).sum().detach(),
    }
    return loss, metrics
