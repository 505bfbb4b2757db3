"""Losses chosen by a table: one loss object per ``trainer`` config section, built once.

A trainer holds the object :func:`build_loss` makes from its ``trainer`` section (a typed section
of :mod:`post_training.schema.trainers`, or any object or mapping with the same keys) and asks it
everything that depends on the loss:

* ``loss(out, counts)`` (SFT family) or ``loss(stats, ref, batch)`` (preference family): the
  loss and the metric sums of one micro-batch;
* ``linear_in_logps``: the loss is linear in the log-probs and ignores ``lse``, so its gradient
  in the log-probs is known before the forward (the chunked head's gradient-hint path);
* ``needs_reference``: the loss needs reference log-probs (False for the SFT family and for the
  reference-free simpo / orpo);
* ``required_columns``: dataset columns every row must carry (:func:`check_columns` at set-up);
* ``summarize(sums, counts)``: the logged metrics of a window's summed metrics.

Adding a loss: one function in ``post_training.losses``, one class (or entry) here, its schema in
:mod:`post_training.schema.trainers`. A DPO-family loss type is only a function and an entry of
:data:`post_training.losses.dpo.DPO_LOSSES`.

This module imports torch and the loss modules only (no tokenizer, no model, no trainer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from post_training.errors import DataError
from post_training.losses.cpo import check_cpo_options, cpo_loss
from post_training.losses.dpo import (
    REFERENCE_FREE,
    as_loss_types,
    check_dpo_section,
    dpo_loss,
)
from post_training.losses.irl import irl_loss
from post_training.losses.kto import check_kto_options, kto_loss, summarize_kto
from post_training.losses.plw import ln_plw_loss, plw_loss
from post_training.losses.qrpo import check_qrpo_options, qrpo_loss
from post_training.losses.reward import check_reward_options, reward_loss

log = logging.getLogger(__name__)

COUNT_KEYS = ("num_prompt_tokens", "num_completion_tokens", "num_sequences")
"""The SFT family's normalising counts (over the whole accumulation window, all ranks), in the
order the loss functions take them."""

PAIR_COUNT_KEY = "num_pairs"
"""The preference family's normalising count: pairs in the accumulation window, all ranks."""

TOKEN_COLUMNS = frozenset(
    ("input_ids", "labels", "prompt_mask", "completion_mask", "position_ids", "row_index")
)
"""Keys of a tokenized row that are its tokens and index, not data columns (for errors)."""

_MISSING = object()


def _get(section: Any, key: str, default: Any = _MISSING) -> Any:
    """``section.key`` of a typed section, or ``section[key]`` of a mapping."""
    if isinstance(section, Mapping):
        if key in section:
            return section[key]
    elif hasattr(section, key):
        return getattr(section, key)
    if default is _MISSING:
        raise KeyError(f"trainer section has no '{key}'")
    return default


# --------------------------------------------------------------------------- summaries


def summarize_sft(sums: Mapping[str, float], counts: Mapping[str, float]) -> dict[str, float]:
    """The SFT family's logged metrics from a window's summed metrics and counts.

    ``sums`` holds the loss's ``prompt_nll_sum`` / ``completion_nll_sum`` and the trainer's
    ``prompt_correct_sum`` / ``completion_correct_sum`` (argmax hits), optionally
    ``exact_match_sum`` (sequences whose final turn greedy decoding reproduces) and IRL's
    ``td_sum`` / ``reward_sum``; ``counts`` the :data:`COUNT_KEYS`.
    """
    n_p = max(counts.get("num_prompt_tokens", 0.0), 1.0)
    n_c = max(counts.get("num_completion_tokens", 0.0), 1.0)
    completion_loss = sums["completion_nll_sum"] / n_c
    out = {
        "prompt_loss": sums["prompt_nll_sum"] / n_p,
        "completion_loss": completion_loss,
        "completion_perplexity": math.exp(min(completion_loss, 50.0)),
        "prompt_token_accuracy": sums["prompt_correct_sum"] / n_p,
        "completion_token_accuracy": sums["completion_correct_sum"] / n_c,
        "token_accuracy": (sums["prompt_correct_sum"] + sums["completion_correct_sum"])
        / (n_p + n_c),
        "num_completion_tokens": counts.get("num_completion_tokens", 0.0),
    }
    if "exact_match_sum" in sums:  # sequences with completion tokens
        out["sequence_exact_match"] = sums["exact_match_sum"] / max(
            counts.get("num_sequences", 0.0), 1.0
        )
    if "td_sum" in sums:
        out["td_loss"] = sums["td_sum"] / n_c
        out["implicit_reward"] = sums["reward_sum"] / n_c
    return out


def summarize_preference(
    sums: Mapping[str, float], counts: Mapping[str, float]
) -> dict[str, float]:
    """The preference family's logged metrics: each per-pair metric sum over the window's
    ``num_pairs``; ``logits/chosen`` / ``logits/rejected`` from ``logits/<side>_sum`` over
    ``logits/<side>_tokens``; the ``loss`` key is skipped (the loop logs it)."""
    pairs = max(counts.get(PAIR_COUNT_KEY, 0.0), 1.0)
    out = {}
    for key, value in sums.items():
        if key == "loss" or key.startswith("logits/"):
            continue
        out[key] = value / pairs
    for side in ("chosen", "rejected"):
        tokens = max(sums.get(f"logits/{side}_tokens", 0.0), 1.0)
        out[f"logits/{side}"] = sums.get(f"logits/{side}_sum", 0.0) / tokens
    return out


# --------------------------------------------------------------------------- SFT family


class SFTLoss(ABC):
    """A loss of the SFT family, on the per-token tensors of ``trainers.sft.sft_forward``.

    ``out`` holds, aligned to the predicted token ([B, T]): ``logps``, ``lse``, ``target``,
    ``prompt``, ``completion`` and ``sequence`` (packed document ids, or None). A loss reads only
    those (the gradient-hint probe passes exactly these, ``correct`` / ``logit_mean`` absent).
    ``counts`` holds the :data:`COUNT_KEYS`. Returns the micro-batch's loss (already normalised
    by the window's counts) and its metric sums (detached scalars).
    """

    name: str = ""
    linear_in_logps: bool = False
    needs_reference: bool = False
    required_columns: tuple[str, ...] = ()
    columns_hint: str = ""

    @abstractmethod
    def __call__(
        self, out: Mapping[str, Any], counts: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def summarize(self, sums: Mapping[str, float], counts: Mapping[str, float]) -> dict[str, float]:
        return summarize_sft(sums, counts)


@dataclass(frozen=True)
class NLLLoss(SFTLoss):
    """``trainer=sft``: mean NLL over the window's completion tokens (PLW, prompt weight 0)."""

    name = "sft"
    linear_in_logps = True

    @classmethod
    def from_section(cls, section: Any) -> NLLLoss:
        return cls()

    def __call__(self, out, counts):
        return plw_loss(
            out["logps"], out["prompt"], out["completion"], 0.0, *(counts[k] for k in COUNT_KEYS)
        )


@dataclass(frozen=True)
class PLWLoss(SFTLoss):
    """``trainer=plw``: :func:`~post_training.losses.plw.plw_loss` with
    ``plw_args.prompt_loss_weight`` and ``plw_args.sequence_level_loss``."""

    prompt_loss_weight: float
    sequence_level: bool = False

    name = "plw"
    linear_in_logps = True
    loss_fn = staticmethod(plw_loss)

    @classmethod
    def from_section(cls, section: Any) -> PLWLoss:
        plw = _get(section, "plw_args")
        return cls(
            prompt_loss_weight=float(_get(plw, "prompt_loss_weight")),
            sequence_level=bool(_get(plw, "sequence_level_loss")),
        )

    def __call__(self, out, counts):
        return self.loss_fn(
            out["logps"],
            out["prompt"],
            out["completion"],
            self.prompt_loss_weight,
            *(counts[k] for k in COUNT_KEYS),
            sequence_level=self.sequence_level,
            sequence_ids=out["sequence"],
        )


@dataclass(frozen=True)
class LNPLWLoss(PLWLoss):
    """``trainer=ln-plw``: :func:`~post_training.losses.plw.ln_plw_loss`,
    ``plw · mean prompt CE + mean completion CE``."""

    name = "ln-plw"
    loss_fn = staticmethod(ln_plw_loss)


@dataclass(frozen=True)
class IRLLoss(SFTLoss):
    """``trainer=irl``: :func:`~post_training.losses.irl.irl_loss`, the PLW loss of
    ``plw_args`` + ``irl_args.lambda_td`` · the TD term (discount ``irl_args.gamma``)."""

    prompt_loss_weight: float
    sequence_level: bool
    lambda_td: float
    gamma: float

    name = "irl"
    linear_in_logps = False  # the TD term is quadratic in Q and uses lse

    @classmethod
    def from_section(cls, section: Any) -> IRLLoss:
        plw, irl = _get(section, "plw_args"), _get(section, "irl_args")
        return cls(
            prompt_loss_weight=float(_get(plw, "prompt_loss_weight")),
            sequence_level=bool(_get(plw, "sequence_level_loss")),
            lambda_td=float(_get(irl, "lambda_td")),
            gamma=float(_get(irl, "gamma")),
        )

    def __call__(self, out, counts):
        return irl_loss(
            out["logps"],
            out["lse"],
            out["target"],
            out["prompt"],
            out["completion"],
            *(counts[k] for k in COUNT_KEYS),
            lambda_td=self.lambda_td,
            gamma=self.gamma,
            prompt_loss_weight=self.prompt_loss_weight,
            sequence_level=self.sequence_level,
            sequence_ids=out["sequence"],
        )


# --------------------------------------------------------------------------- preference family


class PreferenceLoss(ABC):
    """A pairwise preference loss, on the per-pair statistics of ``pair_statistics``.

    ``stats`` holds [B] tensors ``chosen_logps`` / ``rejected_logps`` (summed completion
    log-probs) and ``chosen_lengths`` / ``rejected_lengths``; ``ref`` is ``(ref_chosen_logps,
    ref_rejected_logps)`` or None when ``needs_reference`` is False; ``batch`` the collated
    batch (for ``required_columns``). Returns per-pair losses [B] (the trainer sums them and
    divides by the window's ``num_pairs``) and per-pair metrics [B], detached.
    """

    name: str = ""
    linear_in_logps: bool = False
    needs_reference: bool = True
    required_columns: tuple[str, ...] = ()
    columns_hint: str = ""
    ld_alpha: float | None = None
    """LD-DPO's weight of the longer side's tail tokens, used when the trainer sums the
    log-probs of policy and reference alike (None: plain sums)."""
    needs_sum_sq: bool = False
    """The trainer's forward adds each side's WPO log-weight (``<side>_wpo_logw``)."""
    sync_ref_model: bool = False
    """TR-DPO: the trainer mixes the policy into the reference model every
    ``ref_model_sync_steps`` steps with weight ``ref_model_mixup_alpha``."""
    window_kl: bool = False
    """KTO: the trainer estimates the KL reference point ``z₀`` over the accumulation window
    and all ranks before the first forward and passes it as ``stats["kl"]``."""

    @abstractmethod
    def __call__(
        self,
        stats: Mapping[str, torch.Tensor],
        ref: tuple[torch.Tensor, torch.Tensor] | None,
        batch: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def summarize(self, sums: Mapping[str, float], counts: Mapping[str, float]) -> dict[str, float]:
        return summarize_preference(sums, counts)


P = TypeVar("P", bound="PreferenceLoss")


def _from_fields(cls: type[P], section: Any) -> P:
    """``cls`` from the section's keys named like its fields (a missing key: the default)."""
    return cls(
        **{
            f.name: _get(section, f.name, f.default)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        }
    )


@dataclass(frozen=True)
class DPOLoss(PreferenceLoss):
    """``trainer=dpo``: :func:`~post_training.losses.dpo.dpo_loss` of ``trainer.loss_type``
    (the DPO family, or the reference-free simpo / orpo; a list of types with
    ``loss_weights``), with TRL's options: ``f_divergence_type``, ``ld_alpha`` (LD-DPO, applied
    by the trainer when it sums the log-probs), ``use_weighting`` (WPO: the trainer adds the
    per-token ``log Σ p²`` to the forward) and ``sync_ref_model`` (TR-DPO: the trainer's
    callback mixes the policy into the reference model). The options are checked when built."""

    loss_type: str | tuple[str, ...] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    simpo_gamma: float = 0.5
    orpo_alpha: float = 0.1
    discopop_tau: float = 0.05
    loss_weights: tuple[float, ...] | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    name = "dpo"

    def __post_init__(self) -> None:
        check_dpo_section(self)
        if self.sync_ref_model and not self.needs_reference:
            raise ValueError(
                f"trainer.sync_ref_model=true: loss_type={self.loss_type!r} is reference-free; "
                "there is no reference model to synchronise."
            )

    @classmethod
    def from_section(cls, section: Any) -> DPOLoss:
        loss = _from_fields(cls, section)
        types = as_loss_types(loss.loss_type)
        weights = None if loss.loss_weights is None else tuple(map(float, loss.loss_weights))
        return dataclasses.replace(
            loss, loss_type=types[0] if len(types) == 1 else types, loss_weights=weights
        )

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return as_loss_types(self.loss_type)[0] not in REFERENCE_FREE

    @property
    def needs_sum_sq(self) -> bool:  # type: ignore[override]
        return self.use_weighting

    def __call__(self, stats, ref, batch):
        ref_c, ref_r = ref if ref is not None else (None, None)
        pair_weights = None
        if self.use_weighting:
            pair_weights = torch.exp(stats["chosen_wpo_logw"] + stats["rejected_wpo_logw"])
        return dpo_loss(
            stats["chosen_logps"],
            stats["rejected_logps"],
            ref_c,
            ref_r,
            stats["chosen_lengths"],
            stats["rejected_lengths"],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            orpo_alpha=self.orpo_alpha,
            discopop_tau=self.discopop_tau,
            nll_weight=self.nll_weight,
            loss_weights=self.loss_weights,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            pair_weights=pair_weights,
        )


@dataclass(frozen=True)
class CPOLoss(PreferenceLoss):
    """``trainer=cpo``: :func:`~post_training.losses.cpo.cpo_loss` (CPO's sigmoid / hinge /
    ipo / simpo with ``cpo_alpha`` · the chosen NLL, and AlphaPO); reference-free. The options
    are checked when built."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    alpha: float = 0.0

    name = "cpo"
    needs_reference = False

    def __post_init__(self) -> None:
        check_cpo_options(
            self.loss_type, self.beta, self.label_smoothing, self.cpo_alpha, self.alpha
        )

    @classmethod
    def from_section(cls, section: Any) -> CPOLoss:
        return _from_fields(cls, section)

    def __call__(self, stats, ref, batch):
        return cpo_loss(
            stats["chosen_logps"],
            stats["rejected_logps"],
            stats["chosen_lengths"],
            stats["rejected_lengths"],
            beta=self.beta,
            loss_type=self.loss_type,
            cpo_alpha=self.cpo_alpha,
            simpo_gamma=self.simpo_gamma,
            label_smoothing=self.label_smoothing,
            alpha=self.alpha,
        )


@dataclass(frozen=True)
class KTOLoss(PreferenceLoss):
    """``trainer=kto``: :func:`~post_training.losses.kto.kto_loss` on unpaired examples. Each
    tokenized row holds the example (document 0: prompt + completion) and its mismatched KL
    completion (document 1: the same prompt + another example's completion), so
    ``stats["chosen_*"]`` are the example's and ``stats["rejected_*"]`` the KL pair's; the
    trainer adds ``stats["kl"]``, the window's reference point ``z₀``."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    name = "kto"
    required_columns = ("kto_label",)
    columns_hint = (
        "KTO needs unpaired rows (prompt, completion, label), or paired data with "
        "dataset.unpair=true"
    )

    def __post_init__(self) -> None:
        check_kto_options(self.loss_type, self.beta, self.desirable_weight, self.undesirable_weight)

    @classmethod
    def from_section(cls, section: Any) -> KTOLoss:
        return _from_fields(cls, section)

    @property
    def window_kl(self) -> bool:  # type: ignore[override]
        return self.loss_type == "kto"  # apo_zero_unpaired has no KL term

    def __call__(self, stats, ref, batch):
        if ref is None:
            raise ValueError("KTO needs reference log-probs (ref=None given).")
        kl = stats["kl"] if self.window_kl else torch.zeros((), device=ref[0].device)
        losses, sums = kto_loss(
            stats["chosen_logps"],
            ref[0],
            batch["kto_label"],
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )
        # TRL's logits/chosen and logits/rejected: the desirable / undesirable examples'
        # mean logit (document 0; document 1 is the KL completion)
        desirable = batch["kto_label"].to(torch.bool)
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            sums[f"logits/{side}_sum"] = (stats["chosen_logit_sum"] * rows).sum()
            sums[f"logits/{side}_tokens"] = (stats["chosen_lengths"] * rows).sum().detach()
        return losses, sums

    def summarize(self, sums: Mapping[str, float], counts: Mapping[str, float]) -> dict[str, float]:
        return summarize_kto(sums, counts)


@dataclass(frozen=True)
class QRPOLoss(PreferenceLoss):
    """``trainer=qrpo``: :func:`~post_training.losses.qrpo.qrpo_loss` on the batch's quantile
    rewards; logs a warning whenever ``beta_cap`` binds. The options are checked when built."""

    beta: float = 0.1
    transform: str = "identity"
    approx_log_partition: bool = False
    beta_length_normalized: bool = False
    loss_length_normalized: bool = False
    beta_cap: float | None = None
    min_quantile: float | None = None

    name = "qrpo"
    required_columns = ("chosen_quantile_reward", "rejected_quantile_reward")
    columns_hint = (
        "QRPO needs quantile rewards: give chosen_quantile_reward / rejected_quantile_reward, "
        "or chosen_reward, rejected_reward and ref_rewards"
    )

    def __post_init__(self) -> None:
        check_qrpo_options(
            self.beta, self.transform, self.approx_log_partition, self.beta_cap, self.min_quantile
        )

    @classmethod
    def from_section(cls, section: Any) -> QRPOLoss:
        return _from_fields(cls, section)

    def __call__(self, stats, ref, batch):
        for key in self.required_columns:
            if key not in batch:
                raise KeyError(
                    f"QRPO needs '{key}' per pair: precompute it, or give chosen_reward, "
                    "rejected_reward and ref_rewards in the dataset"
                )
        if ref is None:
            raise ValueError("QRPO needs reference log-probs (ref=None given).")
        per_pair, metrics = qrpo_loss(
            stats["chosen_logps"],
            stats["rejected_logps"],
            ref[0],
            ref[1],
            batch["chosen_quantile_reward"].float(),
            batch["rejected_quantile_reward"].float(),
            stats["chosen_lengths"],
            stats["rejected_lengths"],
            beta=self.beta,
            transform=self.transform,
            approx_log_partition=self.approx_log_partition,
            beta_length_normalized=self.beta_length_normalized,
            loss_length_normalized=self.loss_length_normalized,
            beta_cap=self.beta_cap,
            min_quantile=self.min_quantile,
        )
        capped = metrics.get("beta_capped_fraction")
        if capped is not None and float(capped.max()) > 0:
            log.warning(
                "QRPO: trainer.beta_cap=%s binds for %.1f%% of this batch's completions",
                self.beta_cap,
                100 * float(capped.float().mean()),
            )
        return per_pair, metrics


# --------------------------------------------------------------------------- the tables

# --------------------------------------------------------------------------- reward models


@dataclass(frozen=True)
class RewardLoss:
    """``trainer=reward`` (``train_reward``): :func:`~post_training.losses.reward.reward_loss`
    on the rewards the model gives each pair's chosen and rejected conversation; a dataset
    column ``margin`` (when the rows have it) is subtracted from their difference."""

    center_rewards_coefficient: float | None = None

    name = "reward"

    def __post_init__(self) -> None:
        check_reward_options(self.center_rewards_coefficient)

    @classmethod
    def from_section(cls, section: Any) -> RewardLoss:
        return _from_fields(cls, section)

    def __call__(
        self, chosen: torch.Tensor, rejected: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return reward_loss(chosen, rejected, batch.get("margin"), self.center_rewards_coefficient)

    def summarize(self, sums: Mapping[str, float], counts: Mapping[str, float]) -> dict[str, float]:
        """Each per-pair metric's mean over the window's pairs (``accuracy``, ``margin``, ...)."""
        pairs = max(counts.get(PAIR_COUNT_KEY, 0.0), 1.0)
        return {key: value / pairs for key, value in sums.items() if key != "loss"}


SFT_LOSSES: dict[str, Callable[[Any], SFTLoss]] = {
    "sft": NLLLoss.from_section,
    "plw": PLWLoss.from_section,
    "ln-plw": LNPLWLoss.from_section,
    "irl": IRLLoss.from_section,
}
"""``trainer.name`` → the SFT-family loss built from the ``trainer`` section."""

PREFERENCE_LOSSES: dict[str, Callable[[Any], PreferenceLoss]] = {
    "dpo": DPOLoss.from_section,
    "cpo": CPOLoss.from_section,
    "kto": KTOLoss.from_section,
    "qrpo": QRPOLoss.from_section,
}
"""``trainer.name`` → the preference loss built from the ``trainer`` section."""

REWARD_LOSSES: dict[str, Callable[[Any], RewardLoss]] = {"reward": RewardLoss.from_section}
"""``trainer.name`` → the reward model's loss (``train_reward``)."""


def build_loss(
    section: Any, table: Mapping[str, Callable[[Any], SFTLoss | PreferenceLoss]] | None = None
) -> SFTLoss | PreferenceLoss:
    """The loss object of a ``trainer`` section, picked by ``section.name`` in ``table`` (by
    default both families; pass :data:`SFT_LOSSES` or :data:`PREFERENCE_LOSSES` to accept one
    family only). ValueError naming ``trainer.name`` and the known names otherwise; the option
    rules of the loss (``check_dpo_options`` / ``check_qrpo_options``) raise ValueError too."""
    tables = {**SFT_LOSSES, **PREFERENCE_LOSSES} if table is None else table
    name = _get(section, "name", None)
    if name not in tables:
        raise ValueError(f"trainer.name={name!r}: no such loss; known: {', '.join(tables)}")
    return tables[name](section)


def check_columns(
    loss: SFTLoss | PreferenceLoss, rows: Iterable[Mapping[str, Any]], where: str
) -> None:
    """DataError, at set-up, for the first row of ``rows`` that lacks one of the loss's
    ``required_columns``: it names the split (``where``, e.g. ``dataset.train``), the row
    (1-based position in ``rows``, and, when the row carries its ``row_index``, its 1-based
    pair of the source), the column and the data columns the row does have."""
    if not loss.required_columns:
        return
    for position, row in enumerate(rows, start=1):
        for column in loss.required_columns:
            if column not in row:
                pair = int(row["row_index"]) + 1 if "row_index" in row else None
                source = f" (pair {pair} of the source)" if pair is not None else ""
                has = ", ".join(k for k in row if k not in TOKEN_COLUMNS) or "none"
                hint = f"; {loss.columns_hint}" if loss.columns_hint else ""
                raise DataError(
                    f"{where}: row {position}{source} has no '{column}' (its data columns: "
                    f"{has}): trainer.name={loss.name} needs "
                    f"{' and '.join(loss.required_columns)}{hint}"
                )
