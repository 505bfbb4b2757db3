"""CPO (Contrastive Preference Optimization, Xu et al. 2024, arXiv 2401.08417) and AlphaPO
(Gupta et al. 2025, arXiv 2501.03884): reference-free pairwise losses plus an NLL term on the
chosen reply, as TRL 1.16's ``trl.experimental.cpo.CPOTrainer``.

Inputs are per-pair tensors [B]: policy log-probs **summed** over the completion tokens and
the completion token counts. ``sigmoid`` and ``hinge`` use the summed log-probs, ``ipo``,
``simpo`` and ``alphapo`` the length-averaged ones ``ā = logπ / |y|`` (TRL's
``average_log_prob`` for ipo / simpo). With ``s`` the used log-prob and ``u = s_c − s_r``
(AlphaPO: ``u = r_c − r_r`` with ``r = (1 − e^{−α·s}) / α``, the paper's ``(1 − p^{−α}) / α``):

=========  ===========================================================================
loss_type  per-pair loss (before the NLL term)
=========  ===========================================================================
sigmoid    −(1−ε)·log σ(β·u) − ε·log σ(−β·u)  (CPO, Eq. 3; ε = label_smoothing)
hinge      max(0, 1 − β·u)
ipo        (u − 1/(2β))²
simpo      −(1−ε)·log σ(β·u − γ) − ε·log σ(−(β·u − γ))  (SimPO's margin γ = simpo_gamma)
alphapo    simpo on the AlphaPO rewards (``alpha`` ≠ 0), without the NLL term (as TRL)
=========  ===========================================================================

The per-pair loss adds ``cpo_alpha · (−ā_c)``, the chosen reply's length-averaged NLL (TRL's
``cpo_alpha`` times its cross-entropy on the chosen tokens, which TRL averages over the
batch's tokens rather than per pair; the two are equal one pair at a time). ``alpha`` ≠ 0
applies AlphaPO's reward to any loss type, as TRL's ``alpha``.

Metrics per pair (detached, TRL's names): ``rewards/chosen = β·r_c`` (``r = s``, or the
AlphaPO reward), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen`` / ``logps/rejected`` (summed, as every preference trainer here logs them;
TRL's CPO logs the averaged ones for ipo / simpo) and ``nll_loss``.
"""

from __future__ import annotations

import torch

from post_training.losses.dpo import smoothed_sigmoid

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
AVERAGED = ("ipo", "simpo", "alphapo")
"""The types written in length-averaged log-probs."""
SMOOTHED = ("sigmoid", "simpo", "alphapo")
"""The types that use ``label_smoothing``."""


def check_cpo_options(
    loss_type: str, beta: float, label_smoothing: float, cpo_alpha: float, alpha: float
) -> None:
    """The rules of :func:`cpo_loss`'s options; ValueError naming the config key and value."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(
            f"trainer.loss_type={loss_type!r}: Unknown CPO loss_type; expected one of "
            f"{CPO_LOSS_TYPES}."
        )
    if not beta > 0:
        raise ValueError(f"trainer.beta={beta!r}: beta must be > 0.")
    if not cpo_alpha >= 0:
        raise ValueError(f"trainer.cpo_alpha={cpo_alpha!r}: the NLL weight must be >= 0.")
    if label_smoothing and loss_type not in SMOOTHED:
        raise ValueError(
            f"trainer.label_smoothing={label_smoothing!r}: label_smoothing has no meaning for "
            f"loss_type={loss_type!r}; it is used by {SMOOTHED}."
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"trainer.label_smoothing={label_smoothing!r}: must be in [0, 0.5) (at 0.5 the "
            "labels carry no preference)."
        )
    if loss_type == "alphapo" and alpha == 0.0:
        raise ValueError(
            "trainer.alpha=0.0: loss_type=alphapo needs AlphaPO's alpha != 0 (the paper "
            "uses 0.1 to 0.25); alpha=0 is simpo."
        )


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward ``(1 − p^{−α}) / α`` of a (length-averaged) log-prob ``log p``."""
    return (1 - torch.exp(-alpha * logps)) / alpha


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair CPO loss [B] and per-pair metrics [B]; see the module docstring. Not averaged:
    the trainer divides the sum by the pairs of the accumulation window on all ranks."""
    check_cpo_options(loss_type, beta, label_smoothing, cpo_alpha, alpha)
    if chosen_logps.dim() != 1 or chosen_logps.shape != rejected_logps.shape:
        raise ValueError(
            f"chosen_logps / rejected_logps must be [B], got {tuple(chosen_logps.shape)} and "
            f"{tuple(rejected_logps.shape)}."
        )
    if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
        raise ValueError("completion lengths must be >= 1 (a pair with an empty completion).")
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, pr = chosen_logps.to(dtype), rejected_logps.to(dtype)
    len_c, len_r = chosen_lengths.to(dtype), rejected_lengths.to(dtype)
    avg_c = pc / len_c
    if loss_type in AVERAGED:
        used_c, used_r = avg_c, pr / len_r
    else:
        used_c, used_r = pc, pr
    if alpha != 0.0:
        used_c, used_r = alphapo_reward(used_c, alpha), alphapo_reward(used_r, alpha)
    u = used_c - used_r
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid(beta * u, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    elif loss_type == "ipo":
        losses = (u - 1 / (2 * beta)) ** 2
    else:  # simpo, alphapo
        losses = smoothed_sigmoid(beta * u - simpo_gamma, label_smoothing)
    nll = -avg_c
    nll_weight = 0.0 if loss_type == "alphapo" else cpo_alpha
    if nll_weight:
        losses = losses + nll_weight * nll
    reward_c, reward_r = beta * used_c, beta * used_r
    metrics = {
        "rewards/chosen": reward_c,
        "rewards/rejected": reward_r,
        "rewards/margins": reward_c - reward_r,
        "rewards/accuracies": (reward_c > reward_r).to(dtype),
        "logps/chosen": pc,
        "logps/rejected": pr,
        "nll_loss": nll,
    }
    return losses, {k: v.detach() for k, v in metrics.items()}
