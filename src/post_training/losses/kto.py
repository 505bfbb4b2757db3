"""KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired
preference data, as TRL 1.16's ``KTOTrainer``; and its reference-anchored cousin
``apo_zero_unpaired`` (APO-zero on unpaired data, D'Oosterlinck et al. 2024, arXiv 2408.06266).

Inputs are per-example tensors [B]: policy and reference log-probs **summed** over the
completion tokens, the boolean label (desirable or not) and the KL reference point ``z₀``
(a detached scalar). With ``ρ = logπ(y|x) − logπ_ref(y|x)``:

==================  =====================================  ===================================
loss_type           desirable (label true)                 undesirable (label false)
==================  =====================================  ===================================
kto                 λ_D·(1 − σ(β·(ρ − z₀)))  (Eq. 7)       λ_U·(1 − σ(β·(z₀ − ρ)))
apo_zero_unpaired   λ_D·(1 − σ(β·ρ))                       λ_U·σ(β·ρ)
==================  =====================================  ===================================

``λ_D`` / ``λ_U`` are ``desirable_weight`` / ``undesirable_weight`` (for imbalanced data; the
paper recommends ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3]). ``z₀`` estimates
``KL(π ‖ π_ref)`` from mismatched pairs ``(x_i, y_j)``, ``j ≠ i``:
``z₀ = max(0, mean (logπ(y_j|x_i) − logπ_ref(y_j|x_i)))``, with no gradient
(:func:`kl_reference_point`). TRL averages that mean over the micro-batch of each rank; the
trainer here sums over the whole accumulation window on all ranks before the first forward,
so ``z₀`` (and the loss) do not depend on how the window is cut.

The losses are per example, not averaged: the trainer divides their sum by the number of
examples in the window on all ranks (TRL's ``nanmean`` for one batch).

Metrics (detached sums, TRL's names once :func:`summarize_kto` divides them):
``rewards/chosen`` = mean ``β·ρ`` over the desirable examples, ``rewards/rejected`` over the
undesirable ones, ``rewards/margins`` their difference, ``logps/chosen`` / ``logps/rejected``
the summed policy log-probs likewise, ``kl`` = ``z₀``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def check_kto_options(
    loss_type: str, beta: float, desirable_weight: float, undesirable_weight: float
) -> None:
    """The rules of :func:`kto_loss`'s options; ValueError naming the config key and value."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(
            f"trainer.loss_type={loss_type!r}: Unknown KTO loss_type; expected one of "
            f"{KTO_LOSS_TYPES}."
        )
    if not beta > 0:
        raise ValueError(f"trainer.beta={beta!r}: beta must be > 0.")
    for key, value in (
        ("desirable_weight", desirable_weight),
        ("undesirable_weight", undesirable_weight),
    ):
        if not value > 0:
            raise ValueError(f"trainer.{key}={value!r}: must be > 0.")


def kl_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """``Σ (logπ − logπ_ref)`` over mismatched pairs: the KL estimate's numerator (detached);
    ``z₀`` is ``max(0, Σ / n)`` over the whole window."""
    return (kl_logps.detach() - ref_kl_logps.detach()).sum()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example KTO loss [B] and metric sums; see the module docstring. ``labels`` [B]
    are 1 (desirable) or 0; ``kl`` is ``z₀`` (a scalar; clamped at 0 and detached here)."""
    check_kto_options(loss_type, beta, desirable_weight, undesirable_weight)
    if logps.dim() != 1 or logps.shape != ref_logps.shape or logps.shape != labels.shape:
        raise ValueError(
            f"logps, ref_logps and labels must be [B] alike, got {tuple(logps.shape)}, "
            f"{tuple(ref_logps.shape)} and {tuple(labels.shape)}."
        )
    dtype = torch.promote_types(logps.dtype, torch.float32)
    rho = logps.to(dtype) - ref_logps.to(dtype)
    desirable = labels.to(torch.bool)
    z0 = kl.detach().to(dtype).clamp(min=0)
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (rho - z0))
        rejected = 1 - torch.sigmoid(beta * (z0 - rho))
    else:  # apo_zero_unpaired
        chosen = 1 - torch.sigmoid(beta * rho)
        rejected = torch.sigmoid(beta * rho)
    losses = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    rewards = (beta * rho).detach()
    d, u = desirable.to(dtype), (~desirable).to(dtype)
    policy = logps.detach().to(dtype)
    sums = {
        "chosen_reward_sum": (rewards * d).sum(),
        "rejected_reward_sum": (rewards * u).sum(),
        "chosen_logps_sum": (policy * d).sum(),
        "rejected_logps_sum": (policy * u).sum(),
        "num_desirable": d.sum(),
        "num_undesirable": u.sum(),
        "kl_sum": z0 * len(logps),  # / examples: z₀, averaged over the window's steps
    }
    return losses, sums


def summarize_kto(sums: Mapping[str, float], counts: Mapping[str, float]) -> dict[str, float]:
    """TRL's KTO metrics from a window's summed metrics (see the module docstring); a side
    without examples in the window is not logged (as TRL)."""
    out: dict[str, float] = {}
    n_d, n_u = sums.get("num_desirable", 0.0), sums.get("num_undesirable", 0.0)
    if n_d > 0:
        out["rewards/chosen"] = sums["chosen_reward_sum"] / n_d
        out["logps/chosen"] = sums["chosen_logps_sum"] / n_d
    if n_u > 0:
        out["rewards/rejected"] = sums["rejected_reward_sum"] / n_u
        out["logps/rejected"] = sums["rejected_logps_sum"] / n_u
    if n_d > 0 and n_u > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    for side, n in (("chosen", n_d), ("rejected", n_u)):
        tokens = sums.get(f"logits/{side}_tokens", 0.0)
        if n > 0 and tokens > 0:
            out[f"logits/{side}"] = sums[f"logits/{side}_sum"] / tokens
    examples = n_d + n_u
    if examples > 0:
        out["kl"] = sums.get("kl_sum", 0.0) / examples
    return out
