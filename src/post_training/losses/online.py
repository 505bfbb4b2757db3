"""Online RL losses with verifiable rewards: GRPO and its variants, and RLOO. Pure functions.

A *group* is the ``n`` completions sampled for one prompt. Advantages are computed inside each
group (:func:`group_advantages`), so they never depend on which other prompts share a batch, a
micro-batch or a rank. The policy loss of a completion token is PPO's clipped surrogate

    L_t = −min(w·A, clip(w, 1 − ε_low, 1 + ε_high)·A)  (+ β·KL_t),

with ``w`` the importance weight of the current policy against the one that sampled
(``old_logps``; equal to it, so ``w = 1`` with gradient ``∇logπ``, on the first pass over a
generation batch) and ``KL_t = exp(ref − logπ) − (ref − logπ) − 1`` (Schulman's k3 estimator)
against the reference. ``w`` is per token (GRPO, DAPO, Dr. GRPO) or per sequence (GSPO: the
exponential of the mean log-ratio; RLOO: of the summed log-ratio).

Each variant returns the *sum* of its per-token or per-sequence terms and names the count that
divides it (:data:`NORMALISERS`): the trainer sums that count over the whole accumulation window
and all ranks before the first forward, so ``1×k = k×1`` and two ranks equal one process:

- ``grpo`` / ``gspo``: Σ_sequences mean_t(L_t) / number of sequences;
- ``dapo``: Σ_tokens L_t / number of completion tokens;
- ``dr_grpo``: Σ_tokens L_t / (number of sequences × ``max_completion_length``);
- ``rloo``: Σ_sequences L_seq / number of sequences (sequence-level terms, KL in the reward).

These are the formulas of TRL 1.16's ``GRPOTrainer._compute_loss`` (``loss_type`` grpo, dapo,
dr_grpo; GSPO = ``importance_sampling_level="sequence"`` with grpo) and
``RLOOTrainer._compute_loss`` for one micro-batch on one rank; TRL normalises per micro-batch
(grpo: mean over the micro-batch's sequences, divided by the accumulation steps), we per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VARIANTS = ("grpo", "dapo", "dr_grpo", "gspo", "rloo")
NORMALISERS = {
    "grpo": "num_sequences",
    "gspo": "num_sequences",
    "rloo": "num_sequences",
    "dapo": "num_completion_tokens",
    "dr_grpo": "num_sequences",  # × max_completion_length
}
SCALE_REWARDS = ("group", "none")
STD_EPS = 1e-4  # TRL's: (r − mean) / (std + 1e-4)


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", leave_one_out: bool = False
) -> Tensor:
    """Advantages [G·n] of rewards [G·n] laid out group by group (``n = group_size``).

    GRPO (``leave_one_out=False``): ``r − mean(group)``, divided by ``std(group) + 1e-4``
    (unbiased std, as TRL) when ``scale == "group"``, not when ``"none"`` (Dr. GRPO).
    RLOO: ``r_i − mean_{j≠i} r_j`` (needs ``n ≥ 2``), then the same optional scaling.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale!r}: one of {SCALE_REWARDS}")
    grouped = rewards.view(-1, group_size)
    if leave_one_out:
        if group_size < 2:
            raise ValueError("RLOO needs at least 2 generations per prompt")
        baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - baseline
    else:
        advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        advantages = advantages / (std + STD_EPS)
    return advantages.reshape(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL estimate ``exp(ref − logπ) − (ref − logπ) − 1`` (≥ 0, unbiased for
    KL(π‖π_ref) on samples of π)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class ClippedTerms:
    """The variant's summed loss and the per-sequence / per-token parts its metrics need."""

    loss_sum: Tensor  # Σ over the micro-batch of the variant's terms (see the module docstring)
    ratio: Tensor  # importance weights w: [B, T] (token level) or [B, 1] (sequence level)
    low_clipped: Tensor  # w < 1 − ε_low where A < 0 (the clip binds), same shape as ratio
    high_clipped: Tensor  # w > 1 + ε_high where A > 0
    kl: Tensor | None  # [B, T] per-token k3 KL (None without a reference)


def clipped_policy_loss(
    variant: str,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
) -> ClippedTerms:
    """The summed clipped-surrogate loss of one micro-batch.

    ``logps`` / ``old_logps`` / ``ref_logps``: per-token log-probs [B, T] of the completion
    tokens under the policy (with gradient), the sampling policy and the reference; ``mask``
    [B, T] 1 on completion tokens; ``advantages`` [B]. ``beta > 0`` adds ``β·KL_t`` per token
    (GRPO family; RLOO puts its KL into the reward instead, see :func:`rloo_rewards`).
    Divide ``loss_sum`` by the window total of ``NORMALISERS[variant]`` (``dr_grpo``: times
    ``max_completion_length``)."""
    if variant not in VARIANTS:
        raise ValueError(f"loss variant {variant!r}: one of {VARIANTS}")
    mask = mask.to(logps.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    log_ratio = (logps - old_logps) * mask
    if variant == "gspo":
        log_w = (log_ratio.sum(-1) / lengths).unsqueeze(-1)
    elif variant == "rloo":
        log_w = log_ratio.sum(-1, keepdim=True)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    surrogate = -torch.min(ratio * adv, clipped * adv)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    if variant == "rloo":  # one term per sequence
        return ClippedTerms(surrogate.sum(), ratio, low, high, None)
    per_token = surrogate.expand_as(logps)
    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        if beta:
            per_token = per_token + beta * kl
    if variant in ("grpo", "gspo"):
        loss_sum = ((per_token * mask).sum(-1) / lengths).sum()
    elif variant == "dapo":
        loss_sum = (per_token * mask).sum()
    else:  # dr_grpo: the constant max_completion_length goes into the normaliser
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        loss_sum = (per_token * mask).sum() / max_completion_length
    return ClippedTerms(loss_sum, ratio, low, high, kl)


def rloo_rewards(rewards: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float):
    """RLOO's KL-penalised rewards ``r − β·Σ_t (logπ_old − logπ_ref)`` (the sampled sequence's
    log-ratio, as TRL's ``RLOOTrainer`` subtracts it before the leave-one-out baseline)."""
    if not beta:
        return rewards
    kl = ((logps - ref_logps) * mask.to(logps.dtype)).sum(-1)
    return rewards - beta * kl
