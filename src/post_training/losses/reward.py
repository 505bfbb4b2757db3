"""The Bradley–Terry loss of a reward model on preference pairs, as TRL 1.16's
``RewardTrainer``.

Inputs are per-pair tensors [B]: the scalar rewards ``r_c`` / ``r_r`` the model gives the
chosen and the rejected conversation (its one-label head at the conversation's last token), an
optional per-pair ``margin`` (a dataset column: how much better chosen is) and
``center_rewards_coefficient`` ``c`` (Eisenstein et al. 2023: keeps the rewards centred on 0)::

    loss_i = −log σ(r_c − r_r − margin_i) + c·(r_c + r_r)²

The losses are per pair, not averaged: the trainer divides their sum by the number of pairs in
the accumulation window on all ranks (TRL averages both terms over its batch; one batch alike).

Metrics (detached, per pair; TRL's names once averaged): ``accuracy`` (``r_c > r_r``),
``margin`` (``r_c − r_r``), ``rewards/chosen``, ``rewards/rejected``, and ``mean_reward``
(the mean of a pair's two rewards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_reward_options(center_rewards_coefficient: float | None) -> None:
    """ValueError naming the config key and value when an option breaks its rule."""
    if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
        raise ValueError(
            f"trainer.center_rewards_coefficient={center_rewards_coefficient!r}: must be >= 0 "
            "(or null: no centring term)."
        )


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair Bradley–Terry loss [B] and per-pair metrics [B]; see the module docstring."""
    check_reward_options(center_rewards_coefficient)
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards / rejected_rewards must be [B] alike, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}."
        )
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    rc, rr = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    diff = rc - rr
    losses = -F.logsigmoid(diff - margin.to(dtype) if margin is not None else diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (rc + rr) ** 2
    metrics = {
        "accuracy": (diff > 0).to(dtype),
        "margin": diff,
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "mean_reward": (rc + rr) / 2,
    }
    return losses, {k: v.detach() for k, v in metrics.items()}
