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

The reference-based types are a table, :data:`DPO_LOSSES`: ``loss_type`` → a pure per-pair
function of :class:`PairTerms` and the rules it puts on the scalar options
(:class:`OptionRule`). Adding one is a function and an entry; ``LOSS_TYPES``, the option checks
(:func:`check_dpo_options`, called by the config schema and by :func:`dpo_loss`) and the schema
read the table. simpo and orpo (``REFERENCE_FREE``) are computed by :func:`dpo_loss` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairTerms:
    """The per-pair quantities [B] a reference-based loss is written in (float32 or wider).

    Built once per call of :func:`dpo_loss`; each loss function of :data:`DPO_LOSSES` picks the
    terms it needs.
    """

    rho_c: torch.Tensor
    """``ρ_c = logπ(y_c|x) − logπ_ref(y_c|x)``, log-probs summed over the completion tokens."""
    rho_r: torch.Tensor
    """``ρ_r``, the same for the rejected completion."""
    reward_c: torch.Tensor
    """``β·ρ_c``."""
    reward_r: torch.Tensor
    """``β·ρ_r``."""
    score_c: torch.Tensor
    """``f'(π/π_ref)`` of the chosen side under ``f_divergence_type`` (``ρ_c`` for the
    default reverse KL): what the f-divergence-aware types (``z``, ipo, sigmoid_norm) use."""
    score_r: torch.Tensor
    """The same for the rejected side."""
    z: torch.Tensor
    """``z = β·(score_c − score_r)``; ``β·(ρ_c − ρ_r)`` under the reverse KL."""
    len_c: torch.Tensor
    """``|y_c|``, the chosen completion's token count (as a float tensor)."""
    len_r: torch.Tensor
    """``|y_r|``."""
    beta: float
    """``β``."""
    label_smoothing: float
    """``ε``."""
    discopop_tau: float
    """DiscoPOP's temperature ``τ``."""


@dataclass(frozen=True)
class OptionRule:
    """A rule one loss type puts on one scalar option of ``trainer``: when ``holds(value)`` is
    False, :func:`check_dpo_options` raises ``trainer.<key>=<value>: <loss_type> needs <text>``.
    A type with a rule on ``label_smoothing`` uses it; every other type refuses a non-zero one.
    """

    key: str
    holds: Callable[[float], bool]
    text: str


@dataclass(frozen=True)
class DPOLossType:
    """One entry of :data:`DPO_LOSSES`: the per-pair loss ``fn(terms) -> [B]``, its option
    rules, and whether it is written in the f-divergence scores (``z`` / ``score_*``; then any
    ``f_divergence_type`` applies) rather than in the raw log-ratios ``ρ``."""

    fn: Callable[[PairTerms], torch.Tensor]
    rules: tuple[OptionRule, ...] = ()
    f_divergence: bool = False


def smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``−(1−ε)·log σ(z) − ε·log σ(−z)``."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def sigmoid_loss(t: PairTerms) -> torch.Tensor:
    return smoothed_sigmoid(t.z, t.label_smoothing)


def hinge_loss(t: PairTerms) -> torch.Tensor:
    return torch.relu(1 - t.z)


def ipo_loss(t: PairTerms) -> torch.Tensor:
    return (t.score_c / t.len_c - t.score_r / t.len_r - 1 / (2 * t.beta)) ** 2


def sigmoid_norm_loss(t: PairTerms) -> torch.Tensor:
    """DPO on length-averaged log-ratios: ``−log σ(β·(s_c/|y_c| − s_r/|y_r|))`` (TRL's
    ``sigmoid_norm``; with ``label_smoothing`` the cDPO form)."""
    z = t.beta * (t.score_c / t.len_c - t.score_r / t.len_r)
    return smoothed_sigmoid(z, t.label_smoothing)


def robust_loss(t: PairTerms) -> torch.Tensor:
    eps = t.label_smoothing
    return (-(1 - eps) * F.logsigmoid(t.z) + eps * F.logsigmoid(-t.z)) / (1 - 2 * eps)


def exo_pair_loss(t: PairTerms) -> torch.Tensor:
    z, eps = t.z, t.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair_loss(t: PairTerms) -> torch.Tensor:
    reward_c, reward_r = t.reward_c, t.reward_r
    return -F.logsigmoid(reward_c) - 0.5 * F.logsigmoid(-reward_c) - 0.5 * F.logsigmoid(-reward_r)


def bco_pair_loss(t: PairTerms) -> torch.Tensor:
    return -F.logsigmoid(t.reward_c) - F.logsigmoid(-t.reward_r)


def sppo_hard_loss(t: PairTerms) -> torch.Tensor:
    return (t.rho_c - 0.5 / t.beta) ** 2 + (t.rho_r + 0.5 / t.beta) ** 2


def apo_zero_loss(t: PairTerms) -> torch.Tensor:
    return torch.sigmoid(-t.reward_c) + torch.sigmoid(t.reward_r)


def apo_down_loss(t: PairTerms) -> torch.Tensor:
    return torch.sigmoid(t.reward_c) + torch.sigmoid(-t.z)


def discopop_loss(t: PairTerms) -> torch.Tensor:
    # m·e^{−z} is computed as e^{log σ(z/τ) − z}: no inf·0 for z ≪ 0
    modulation = torch.sigmoid(-t.z / t.discopop_tau)  # 1 − m
    return -F.logsigmoid(t.z) * modulation + torch.exp(F.logsigmoid(t.z / t.discopop_tau) - t.z)


SMOOTHING_BELOW_HALF = OptionRule(
    "label_smoothing",
    lambda eps: 0.0 <= eps < 0.5,
    "label_smoothing in [0, 0.5) (less than 0.5: at ε = 0.5 the labels carry no preference)",
)

DPO_LOSSES: dict[str, DPOLossType] = {
    "sigmoid": DPOLossType(sigmoid_loss, (SMOOTHING_BELOW_HALF,), f_divergence=True),
    "sigmoid_norm": DPOLossType(sigmoid_norm_loss, (SMOOTHING_BELOW_HALF,), f_divergence=True),
    "hinge": DPOLossType(hinge_loss, f_divergence=True),
    "ipo": DPOLossType(ipo_loss, f_divergence=True),
    "robust": DPOLossType(robust_loss, (SMOOTHING_BELOW_HALF,), f_divergence=True),
    "exo_pair": DPOLossType(
        exo_pair_loss,
        (
            OptionRule(
                "label_smoothing",
                lambda eps: 0.0 < eps < 1.0,
                "0 < label_smoothing < 1 (EXO's ε; the paper uses 1e-3)",
            ),
        ),
        f_divergence=True,
    ),
    "nca_pair": DPOLossType(nca_pair_loss),
    "bco_pair": DPOLossType(bco_pair_loss),
    "sppo_hard": DPOLossType(sppo_hard_loss),
    "apo_zero": DPOLossType(apo_zero_loss),
    "apo_down": DPOLossType(apo_down_loss),
    "discopop": DPOLossType(
        discopop_loss,
        (OptionRule("discopop_tau", lambda tau: tau > 0, "discopop_tau > 0"),),
        f_divergence=True,
    ),
}
"""The reference-based loss types: ``loss_type`` → its per-pair loss and option rules. Adding a
DPO-family loss is one function of :class:`PairTerms` and one entry here; ``DPO_LOSS_TYPES``,
``LOSS_TYPES``, :func:`check_dpo_options` and the config schema read this table when asked."""

REFERENCE_FREE = ("simpo", "orpo")
REFERENCE_FREE_RULES: dict[str, tuple[OptionRule, ...]] = {
    "simpo": (SMOOTHING_BELOW_HALF,),
    "orpo": (
        OptionRule(
            "nll_weight",
            lambda weight: weight == 0.0,
            "nll_weight=0 (orpo already contains the chosen NLL term)",
        ),
    ),
}
"""The option rules of the reference-free types, whose losses :func:`dpo_loss` computes itself."""


def loss_types() -> tuple[str, ...]:
    """Every accepted ``loss_type``: the table's, then the reference-free ones (read now)."""
    return (*DPO_LOSSES, *REFERENCE_FREE)


def _rules(loss_type: str) -> tuple[OptionRule, ...]:
    spec = DPO_LOSSES.get(loss_type)
    return spec.rules if spec is not None else REFERENCE_FREE_RULES[loss_type]


def label_smoothing_types() -> tuple[str, ...]:
    """The types that use ``label_smoothing`` (those with a rule on it), read now."""
    return tuple(t for t in loss_types() if any(r.key == "label_smoothing" for r in _rules(t)))


def __getattr__(name: str) -> tuple[str, ...]:
    # DPO_LOSS_TYPES, LOSS_TYPES and LABEL_SMOOTHING_TYPES are computed from the table on each
    # access, so an entry added to DPO_LOSSES (even at run time) is seen everywhere.
    if name == "DPO_LOSS_TYPES":
        return tuple(DPO_LOSSES)
    if name == "LOSS_TYPES":
        return loss_types()
    if name == "LABEL_SMOOTHING_TYPES":
        return label_smoothing_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, accurate on both sides of ``−log 2`` (Mächler 2012)."""
    small = x < -math.log(2.0)
    return torch.where(small, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


NLL_ENTRY = "sft"
"""The ``loss_type`` list entry for the chosen reply's NLL (TRL's ``"sft"``): its weight in
``loss_weights`` is an ``nll_weight`` (per pair, length-averaged; see the module docs)."""


def _f_reverse_kl(ratio: torch.Tensor, coef: float) -> torch.Tensor:
    return ratio


def _f_forward_kl(ratio: torch.Tensor, coef: float) -> torch.Tensor:
    return 1 - torch.exp(-ratio)  # f'(u) = 1 − 1/u


def _f_js_divergence(ratio: torch.Tensor, coef: float) -> torch.Tensor:
    return math.log(2) + F.logsigmoid(ratio)  # f'(u) = log(2u / (1 + u))


def _f_alpha_divergence(ratio: torch.Tensor, coef: float) -> torch.Tensor:
    if abs(coef - 1.0) < 1e-6:  # the limit α → 1 is the reverse KL
        return ratio
    # f'(u) = (u^(α−1) − 1) / (α − 1); exp clamped at 80 as TRL does (finite in fp32)
    return (torch.exp(((coef - 1.0) * ratio).clamp(max=80.0)) - 1.0) / (coef - 1.0)


F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": _f_reverse_kl,
    "forward_kl": _f_forward_kl,
    "js_divergence": _f_js_divergence,
    "alpha_divergence": _f_alpha_divergence,
}
"""``f_divergence_type`` → the score ``f'(π/π_ref)`` of a side from its log-ratio ``ρ`` and
``f_alpha_divergence_coef`` (f-DPO, Wang et al. 2023, arXiv 2309.16240, Table 1; TRL's
``f_divergence_type``). Only the types written in ``z`` take a non-default one."""


def as_loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """``loss_type`` as a tuple: one name, or a list of names (MPO-style combinations)."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def _key(types: tuple[str, ...]) -> str:
    """How ``trainer.loss_type`` is printed in an error."""
    return repr(types[0]) if len(types) == 1 else repr(list(types))


def check_dpo_options(
    loss_type: str | Sequence[str],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    nll_weight: float,
    *,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
) -> None:
    """The scalar rules of :func:`dpo_loss`'s options, for the config schema and the loss alike.

    Raises ValueError whose message starts with the config key and its value
    (``trainer.label_smoothing=0.7: ...``). The per-type rules are those of each listed type's
    table entry (:class:`OptionRule`); a non-zero ``label_smoothing`` needs a listed type that
    uses it; ``loss_weights`` (one per listed type, ≥ 0) only with a list; simpo / orpo only
    alone; the ``sft`` entry only in a list; ``f_divergence_type`` other than the reverse KL
    only for types written in ``z``; ``ld_alpha`` in [0, 1].
    """
    types = as_loss_types(loss_type)
    known = (*loss_types(), NLL_ENTRY)
    if not types:
        raise ValueError("trainer.loss_type=[]: give one loss type or a list of them.")
    for name in types:
        if name not in known:
            raise ValueError(
                f"trainer.loss_type={_key(types)}: Unknown loss_type {name!r}; expected one of "
                f"{loss_types()} (in a list also {NLL_ENTRY!r}, the chosen reply's NLL)."
            )
    if len(set(types)) != len(types):
        raise ValueError(f"trainer.loss_type={_key(types)}: a loss type is listed twice.")
    free = [t for t in types if t in REFERENCE_FREE]
    if free and len(types) > 1:
        raise ValueError(
            f"trainer.loss_type={_key(types)}: {free[0]} is reference-free and cannot be "
            "combined with other loss types."
        )
    if types == (NLL_ENTRY,):
        raise ValueError(
            f"trainer.loss_type={_key(types)}: '{NLL_ENTRY}' alone is SFT; combine it with a "
            "preference loss type, or train with train_sft."
        )
    if NLL_ENTRY in types and nll_weight:
        raise ValueError(
            f"trainer.nll_weight={nll_weight!r}: the loss_type list already has "
            f"'{NLL_ENTRY}'; give its weight in loss_weights and set nll_weight=0."
        )
    if loss_weights is not None:
        if len(loss_weights) != len(types):
            raise ValueError(
                f"trainer.loss_weights={list(loss_weights)!r}: needs one weight per loss type "
                f"of trainer.loss_type={_key(types)} ({len(types)})."
            )
        if any(not w >= 0 for w in loss_weights):
            raise ValueError(f"trainer.loss_weights={list(loss_weights)!r}: weights must be >= 0.")
    if not beta > 0:
        raise ValueError(f"trainer.beta={beta!r}: beta must be > 0.")
    if nll_weight < 0:
        raise ValueError(f"trainer.nll_weight={nll_weight!r}: nll_weight must be >= 0.")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"trainer.f_divergence_type={f_divergence_type!r}: expected one of "
            f"{tuple(F_DIVERGENCES)}."
        )
    if f_divergence_type != "reverse_kl":
        unsupported = [
            t
            for t in types
            if t != NLL_ENTRY and not getattr(DPO_LOSSES.get(t), "f_divergence", False)
        ]
        if unsupported:
            supported = tuple(t for t, spec in DPO_LOSSES.items() if spec.f_divergence)
            raise ValueError(
                f"trainer.f_divergence_type={f_divergence_type!r}: loss_type {unsupported[0]!r} "
                f"is written in the raw log-ratios; the f-divergences apply to {supported}."
            )
    if f_divergence_type == "alpha_divergence" and not f_alpha_divergence_coef > 0:
        raise ValueError(
            f"trainer.f_alpha_divergence_coef={f_alpha_divergence_coef!r}: must be > 0."
        )
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"trainer.ld_alpha={ld_alpha!r}: must be in [0, 1] (1: plain DPO).")
    rules = [r for t in types if t != NLL_ENTRY for r in _rules(t)]
    if label_smoothing != 0.0 and not any(r.key == "label_smoothing" for r in rules):
        raise ValueError(
            f"trainer.label_smoothing={label_smoothing!r}: label_smoothing has no meaning for "
            f"loss_type={_key(types)}; it is used by {label_smoothing_types()}."
        )
    values = {
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "nll_weight": nll_weight,
    }
    for loss in types:
        for rule in _rules(loss) if loss != NLL_ENTRY else ():
            value = values[rule.key]
            if not rule.holds(value):
                raise ValueError(f"trainer.{rule.key}={value!r}: {loss} needs {rule.text}.")


def check_sync_options(sync_ref_model: bool, mixup_alpha: float, sync_steps: int) -> None:
    """TR-DPO's rules: ``ref_model_mixup_alpha`` in (0, 1], ``ref_model_sync_steps`` ≥ 1."""
    if not sync_ref_model:
        return
    if not 0.0 < mixup_alpha <= 1.0:
        raise ValueError(
            f"trainer.ref_model_mixup_alpha={mixup_alpha!r}: must be in (0, 1] "
            "(the policy's weight in the synchronised reference)."
        )
    if sync_steps < 1:
        raise ValueError(f"trainer.ref_model_sync_steps={sync_steps!r}: must be >= 1.")


def check_dpo_section(section: Any) -> None:
    """Every rule of a ``trainer=dpo`` section (an object with its keys as attributes: the
    typed schema section or the loss object): :func:`check_dpo_options` and
    :func:`check_sync_options`."""
    check_dpo_options(
        section.loss_type,
        section.beta,
        section.label_smoothing,
        section.discopop_tau,
        section.nll_weight,
        loss_weights=section.loss_weights,
        f_divergence_type=section.f_divergence_type,
        f_alpha_divergence_coef=section.f_alpha_divergence_coef,
        ld_alpha=section.ld_alpha,
    )
    check_sync_options(
        section.sync_ref_model, section.ref_model_mixup_alpha, section.ref_model_sync_steps
    )


def _check_tensors(reference_free: bool, tensors: dict[str, torch.Tensor | None]) -> None:
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if reference_free and tensors[name] is not None:
            raise ValueError(f"a reference-free loss_type: pass {name}=None.")
        if not reference_free and tensors[name] is None:
            raise ValueError(f"a reference-based loss_type needs {name}.")
    shape = tensors["chosen_logps"].shape  # type: ignore[union-attr]
    if len(shape) != 1:
        raise ValueError(f"chosen_logps must be [B] (one sum per pair), got shape {tuple(shape)}.")
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, chosen_logps {tuple(shape)}.")
    for name in ("chosen_lengths", "rejected_lengths"):
        if bool((tensors[name] <= 0).any()):  # type: ignore[operator]
            raise ValueError(f"{name} must be >= 1 (a pair with an empty completion).")


def _reference_free_loss(
    loss_type: str,
    avg_c: torch.Tensor,
    avg_r: torch.Tensor,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    orpo_alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """simpo / orpo on the length-averaged log-probs: per-pair loss and orpo's extra metrics."""
    if loss_type == "simpo":
        return smoothed_sigmoid(beta * (avg_c - avg_r) - simpo_gamma, label_smoothing), {}
    if bool(((avg_c >= 0) | (avg_r >= 0)).any()):
        raise ValueError(
            "orpo needs average log-probs < 0 (a completion of probability 1 has infinite odds)."
        )
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    losses = -avg_c - orpo_alpha * log_sigmoid_odds
    return losses, {"log_odds_ratio": log_sigmoid_odds, "log_odds_chosen": log_odds}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_alpha: float = 0.1,
    discopop_tau: float = 0.05,
    nll_weight: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair preference loss [B] and per-pair metrics [B]; see the module docstring.

    ``chosen_logps`` / ``rejected_logps`` (and the reference ones, ``None`` for simpo/orpo) are
    log-probs summed over the completion tokens (LD-DPO's ``ld_alpha`` is applied before, by
    whoever sums them); ``chosen_lengths`` / ``rejected_lengths`` are the completion token
    counts (≥ 1). ``loss_type`` is one type or a list whose per-pair losses are summed with
    ``loss_weights`` (default 1 each; the list may hold ``sft``, the chosen NLL).
    ``pair_weights`` [B] (detached; WPO's ``w_c·w_r``) multiply every term of a pair's loss.
    The losses are not averaged: the trainer divides their sum by the number of pairs in the
    accumulation window on all ranks.

    Metrics, detached, one value per pair: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``nll_loss``; orpo adds ``log_odds_ratio`` and ``log_odds_chosen``; with
    ``pair_weights``, ``wpo_weight``.
    """
    check_dpo_options(
        loss_type,
        beta,
        label_smoothing,
        discopop_tau,
        nll_weight,
        loss_weights=loss_weights,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )
    types = as_loss_types(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    reference_free = types[0] in REFERENCE_FREE
    _check_tensors(
        reference_free,
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
        },
    )
    pc, pr = _float(chosen_logps), _float(rejected_logps)
    len_c, len_r = chosen_lengths.to(pc.dtype), rejected_lengths.to(pc.dtype)
    avg_c, avg_r = pc / len_c, pr / len_r
    nll = -avg_c
    extra: dict[str, torch.Tensor] = {}

    if reference_free:
        reward_c, reward_r = beta * avg_c, beta * avg_r
        losses, extra = _reference_free_loss(
            types[0], avg_c, avg_r, beta, label_smoothing, simpo_gamma, orpo_alpha
        )
        losses = weights[0] * losses
    else:
        rho_c = pc - _float(ref_chosen_logps)  # type: ignore[arg-type]
        rho_r = pr - _float(ref_rejected_logps)  # type: ignore[arg-type]
        reward_c, reward_r = beta * rho_c, beta * rho_r
        score = F_DIVERGENCES[f_divergence_type]
        score_c, score_r = (
            score(rho_c, f_alpha_divergence_coef),
            score(rho_r, f_alpha_divergence_coef),
        )
        terms = PairTerms(
            rho_c=rho_c,
            rho_r=rho_r,
            reward_c=reward_c,
            reward_r=reward_r,
            score_c=score_c,
            score_r=score_r,
            z=beta * (score_c - score_r),
            len_c=len_c,
            len_r=len_r,
            beta=beta,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
        )
        losses = torch.zeros_like(pc)
        for name, weight in zip(types, weights, strict=True):
            term = nll if name == NLL_ENTRY else DPO_LOSSES[name].fn(terms)
            losses = losses + weight * term

    if nll_weight:
        losses = losses + nll_weight * nll
    if pair_weights is not None:
        pair_weights = pair_weights.detach().to(losses.dtype)
        losses = losses * pair_weights
        extra["wpo_weight"] = pair_weights
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
