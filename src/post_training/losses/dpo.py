"""The DPO family of pairwise preference losses, and the reference-free SimPO and ORPO.

Inputs are per-pair tensors [B]: policy (and reference) log-probs **summed** over the completion
tokens, and the completion token counts. Where a method works on length-averaged log-probs
(IPO, SimPO, ORPO and the NLL terms) the average ``logπ / |y|`` is taken here, from the sums and
the lengths. The functions return **per-pair** losses [B], not their mean: the trainer sums them
and divides by the number of pairs of the whole gradient-accumulation window on all ranks, so
that accumulating micro-batches equals one big batch.

Notation: ``ρ_c = logπ(y_c|x) − logπ_ref(y_c|x)`` and ``ρ_r`` likewise (summed log-ratios),
``Δ = ρ_c − ρ_r``, ``z = β·Δ``, ``σ`` the logistic function, ``ε`` = ``label_smoothing``,
``ā = logπ / |y|`` the length-averaged log-prob.

=============  ==========================================================  =====================
loss_type      per-pair loss                                               log-probs
=============  ==========================================================  =====================
sigmoid        −(1−ε)·log σ(z) − ε·log σ(−z)  (DPO, Rafailov et al. 2023,  summed
               arXiv 2305.18290, Eq. 7; ε > 0 is conservative DPO / cDPO,
               Mitchell 2023)
hinge          max(0, 1 − z)  (SLiC, Zhao et al. 2023, arXiv 2305.10425;   summed
               RSO, Liu et al. 2023, arXiv 2309.06657)
ipo            (ρ_c/|y_c| − ρ_r/|y_r| − 1/(2β))²  (IPO, Azar et al. 2023,  **averaged** (as TRL)
               arXiv 2310.12036, Eq. 17; β is the paper's τ)
robust         [−(1−ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε)  (rDPO,          summed
               Chowdhury et al. 2024, arXiv 2403.00409; ε = flip rate)
exo_pair       σ(z)·[log σ(z) − log(1−ε)] + σ(−z)·[log σ(−z) − log ε]     summed
               (EXO, Ji et al. 2024, arXiv 2402.00856, Eq. 16; needs ε > 0)
nca_pair       −log σ(βρ_c) − ½·log σ(−βρ_c) − ½·log σ(−βρ_r)  (NCA,       summed
               Chen et al. 2024, arXiv 2402.05369)
bco_pair       −log σ(βρ_c) − log σ(−βρ_r)  (BCO, Jung et al. 2024,         summed
               arXiv 2404.04656; without BCO's running reward shift, as TRL)
sppo_hard      (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²  (SPPO with hard 0/1       summed
               win probabilities, Wu et al. 2024, arXiv 2405.00675, Eq. 4.7)
apo_zero       σ(−βρ_c) + σ(βρ_r)  (APO-zero, D'Oosterlinck et al. 2024,   summed
               arXiv 2408.06266, Eq. 7)
apo_down       σ(βρ_c) + σ(−z)  (APO-down, same paper, Eq. 8)              summed
discopop       (1−m)·(−log σ(z)) + m·e^{−z},  m = σ(z/τ)  (DiscoPOP,       summed
               Lu et al. 2024, arXiv 2406.08414, Eq. 5; τ = discopop_tau)
simpo          −(1−ε)·log σ(β(ā_c − ā_r) − γ) − ε·log σ(−(β(ā_c − ā_r) − γ))  **averaged**
               (SimPO, Meng et al. 2024, arXiv 2405.14734, Eq. 6; no reference)
orpo           −ā_c − λ·log σ(log odds(ā_c) − log odds(ā_r)),               **averaged**
               odds(ā) = e^ā / (1 − e^ā)  (ORPO, Hong et al. 2024,
               arXiv 2403.07691, Eqs. 6–7; no reference)
=============  ==========================================================  =====================

``nll_weight`` (any type but orpo) adds ``nll_weight·(−ā_c)``, the length-averaged NLL of the
chosen completion (RPO, Pang et al. 2024, arXiv 2404.19733; TRL 1.16's ``loss_type="sft"``
term, which TRL averages over the chosen tokens of the batch rather than per pair).

Parametrisations and conventions, checked against TRL 1.16:

* ``simpo_gamma`` is the target reward margin γ itself, as TRL's ``CPOConfig.simpo_gamma``
  (TRL computes ``β·(ā_c − ā_r − simpo_gamma/β)``). The SimPO repository's ``gamma_beta_ratio``
  is ``simpo_gamma / β``.
* ``orpo_alpha`` is ORPO's λ. TRL's ORPOTrainer calls this weight ``beta``; here ``beta`` only
  scales the logged rewards ``β·ā`` (as TRL's CPO/ORPO log them). Set both to the same value to
  reproduce TRL's logs. ORPO's NLL term here is the chosen completion's per-pair length-averaged
  NLL; TRL's is the token mean over the chosen prompt *and* completion of the batch.
* ``label_smoothing`` is used by sigmoid (cDPO), robust, exo_pair and simpo; any other type
  refuses a non-zero value rather than ignoring it. TRL 1.16's DPO ``sigmoid`` ignores it (it
  equals ours at ε = 0).
* Metrics (per pair, detached): ``rewards/chosen = β·ρ_c`` (summed log-ratios even for ipo, as
  TRL), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (1.0 where the chosen
  reward is strictly greater), ``logps/chosen`` / ``logps/rejected`` (summed policy log-probs;
  TRL's CPO/ORPO log averaged ones there) and ``nll_loss`` (``−ā_c``). For simpo and orpo the
  rewards are ``β·ā`` (TRL's CPO/ORPO convention). orpo adds TRL's ``log_odds_ratio``
  (= ``log σ(log OR)``, the term λ weighs) and ``log_odds_chosen`` (= the log odds ratio).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE
LABEL_SMOOTHING_TYPES = ("sigmoid", "robust", "exo_pair", "simpo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, accurate on both sides of ``−log 2`` (Mächler 2012)."""
    small = x < -math.log(2.0)
    return torch.where(small, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _validate(
    loss_type: str,
    tensors: dict[str, torch.Tensor | None],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    nll_weight: float,
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}.")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    reference_free = loss_type in REFERENCE_FREE
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if reference_free and tensors[name] is not None:
            raise ValueError(f"loss_type={loss_type!r} is reference-free: pass {name}=None.")
        if not reference_free and tensors[name] is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name}.")
    shape = tensors["chosen_logps"].shape  # type: ignore[union-attr]
    if len(shape) != 1:
        raise ValueError(f"chosen_logps must be [B] (one sum per pair), got shape {tuple(shape)}.")
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, chosen_logps {tuple(shape)}.")
    for name in ("chosen_lengths", "rejected_lengths"):
        if bool((tensors[name] <= 0).any()):  # type: ignore[operator]
            raise ValueError(f"{name} must be >= 1 (a pair with an empty completion).")
    if label_smoothing != 0.0 and loss_type not in LABEL_SMOOTHING_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}; "
            f"it is used by {LABEL_SMOOTHING_TYPES}."
        )
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs 0 < label_smoothing < 1 (EXO's ε; the paper uses 1e-3), "
            f"got {label_smoothing}."
        )
    if loss_type in ("sigmoid", "robust", "simpo") and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    if loss_type == "discopop" and not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}.")
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}.")
    if loss_type == "orpo" and nll_weight != 0.0:
        raise ValueError("orpo already contains the chosen NLL term: leave nll_weight=0.")


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``−(1−ε)·log σ(z) − ε·log σ(−z)``."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_alpha: float = 0.1,
    discopop_tau: float = 0.05,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair preference loss [B] and per-pair metrics [B]; see the module docstring.

    ``chosen_logps`` / ``rejected_logps`` (and the reference ones, ``None`` for simpo/orpo) are
    log-probs summed over the completion tokens; ``chosen_lengths`` / ``rejected_lengths`` are
    the completion token counts (≥ 1). The losses are not averaged: the trainer divides their
    sum by the number of pairs in the accumulation window on all ranks.

    Metrics, detached, one value per pair: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``nll_loss``; orpo adds ``log_odds_ratio`` and ``log_odds_chosen``.
    """
    _validate(
        loss_type,
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
        },
        beta,
        label_smoothing,
        discopop_tau,
        nll_weight,
    )
    pc, pr = _float(chosen_logps), _float(rejected_logps)
    len_c, len_r = chosen_lengths.to(pc.dtype), rejected_lengths.to(pc.dtype)
    avg_c, avg_r = pc / len_c, pr / len_r
    nll = -avg_c
    extra: dict[str, torch.Tensor] = {}

    if loss_type in REFERENCE_FREE:
        reward_c, reward_r = beta * avg_c, beta * avg_r
        if loss_type == "simpo":
            losses = _smoothed_sigmoid(beta * (avg_c - avg_r) - simpo_gamma, label_smoothing)
        else:  # orpo
            if bool(((avg_c >= 0) | (avg_r >= 0)).any()):
                raise ValueError(
                    "orpo needs average log-probs < 0 (a completion of probability 1 has "
                    "infinite odds)."
                )
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            log_sigmoid_odds = F.logsigmoid(log_odds)
            losses = nll - orpo_alpha * log_sigmoid_odds
            extra = {"log_odds_ratio": log_sigmoid_odds, "log_odds_chosen": log_odds}
    else:
        rho_c = pc - _float(ref_chosen_logps)  # type: ignore[arg-type]
        rho_r = pr - _float(ref_rejected_logps)  # type: ignore[arg-type]
        reward_c, reward_r = beta * rho_c, beta * rho_r
        z = reward_c - reward_r
        eps = label_smoothing
        if loss_type == "sigmoid":
            losses = _smoothed_sigmoid(z, eps)
        elif loss_type == "hinge":
            losses = torch.relu(1 - z)
        elif loss_type == "ipo":
            losses = (rho_c / len_c - rho_r / len_r - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "exo_pair":
            losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - math.log(eps)
            )
        elif loss_type == "nca_pair":
            losses = (
                -F.logsigmoid(reward_c)
                - 0.5 * F.logsigmoid(-reward_c)
                - 0.5 * F.logsigmoid(-reward_r)
            )
        elif loss_type == "bco_pair":
            losses = -F.logsigmoid(reward_c) - F.logsigmoid(-reward_r)
        elif loss_type == "sppo_hard":
            losses = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            losses = torch.sigmoid(-reward_c) + torch.sigmoid(reward_r)
        elif loss_type == "apo_down":
            losses = torch.sigmoid(reward_c) + torch.sigmoid(-z)
        else:  # discopop; m·e^{−z} is computed as e^{log σ(z/τ) − z}: no inf·0 for z ≪ 0
            modulation = torch.sigmoid(-z / discopop_tau)  # 1 − m
            losses = -F.logsigmoid(z) * modulation + torch.exp(F.logsigmoid(z / discopop_tau) - z)

    if nll_weight:
        losses = losses + nll_weight * nll
    metrics = {
        "rewards/chosen": reward_c,
        "rewards/rejected": reward_r,
        "rewards/margins": reward_c - reward_r,
        "rewards/accuracies": (reward_c > reward_r).to(pc.dtype),
        "logps/chosen": pc,
        "logps/rejected": pr,
        "nll_loss": nll,
        **extra,
    }
    return losses, {k: v.detach() for k, v in metrics.items()}
