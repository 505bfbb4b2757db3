"""``trainer`` sections: one schema per trainer choice, told apart by ``trainer.name``.

``train_sft`` takes the SFT family, ``train_preference`` the preference family; each schema
lists exactly the options of its loss (a key of another trainer is refused).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from post_training.losses import dpo
from post_training.losses.cpo import check_cpo_options
from post_training.losses.qrpo import check_qrpo_options
from post_training.schema.base import Section


class PLWArgs(Section):
    prompt_loss_weight: float = Field(ge=0, le=1, description="weight of prompt tokens (0..1)")
    sequence_level_loss: bool = Field(description="mean over sequences of per-sequence means")


class IRLArgs(Section):
    lambda_td: float = Field(ge=0, description="weight λ of the TD term (0: the base loss)")
    gamma: float = Field(ge=0, le=1, description="discount γ")


class SFTTrainer(Section):
    name: Literal["sft"] = Field(description="mean NLL over completion tokens")


class PLWTrainer(Section):
    name: Literal["plw"] = Field(description="prompt-loss-weighted SFT (arXiv 2401.13586)")
    plw_args: PLWArgs


class LNPLWTrainer(Section):
    name: Literal["ln-plw"] = Field(description="plw · mean prompt CE + mean completion CE")
    plw_args: PLWArgs


class IRLTrainer(Section):
    name: Literal["irl"] = Field(description="TD-regularised MLE (arXiv 2409.01369)")
    plw_args: PLWArgs
    irl_args: IRLArgs


class DPOTrainer(Section):
    name: Literal["dpo"] = Field(description="the DPO family, SimPO and ORPO")
    beta: float = Field(gt=0, description="β: strength of the implicit KL constraint")
    loss_type: str | list[str] = Field(
        description="a DPO-family loss type (post_training.losses.dpo), or a list of them "
        "(MPO-style, weighted by loss_weights; 'sft' in a list is the chosen NLL)"
    )
    loss_weights: list[float] | None = Field(
        description="a list loss_type: one weight per type (default 1 each)"
    )
    label_smoothing: float = Field(
        ge=0, lt=1, description="ε: sigmoid (cDPO), robust, simpo (< 0.5); exo_pair (> 0)"
    )
    nll_weight: float = Field(ge=0, description="+ weight · NLL of the chosen reply (RPO)")
    simpo_gamma: float = Field(description="simpo: target margin γ")
    orpo_alpha: float = Field(ge=0, description="orpo: weight λ of the odds-ratio term")
    discopop_tau: float = Field(gt=0, description="discopop: temperature of the mixing sigmoid")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = (
        Field(description="f-DPO: the divergence of the constraint")
    )
    f_alpha_divergence_coef: float = Field(gt=0, description="alpha_divergence: its α")
    ld_alpha: float | None = Field(
        ge=0, le=1, description="LD-DPO: weight of tokens beyond the shorter reply"
    )
    use_weighting: bool = Field(description="WPO: weight pairs by their on-policy probability")
    sync_ref_model: bool = Field(description="TR-DPO: mix the policy into the reference")
    ref_model_mixup_alpha: float = Field(
        gt=0, le=1, description="TR-DPO: the policy's weight α in each mix"
    )
    ref_model_sync_steps: int = Field(ge=1, description="TR-DPO: steps between mixes")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str | list[str]) -> str | list[str]:
        known = (*dpo.LOSS_TYPES, dpo.NLL_ENTRY)  # read from the loss table now
        for name in dpo.as_loss_types(value):
            if name not in known:
                raise ValueError(f"{name!r}: must be one of {', '.join(dpo.LOSS_TYPES)}")
        return value

    @model_validator(mode="after")
    def _loss_options(self) -> DPOTrainer:
        # The rules of the loss types' table entries (losses.dpo.check_dpo_options), e.g.
        # exo_pair needs 0 < label_smoothing < 1, orpo nll_weight=0; TR-DPO's.
        dpo.check_dpo_section(self)
        return self


class CPOTrainer(Section):
    name: Literal["cpo"] = Field(description="CPO and AlphaPO: reference-free, + chosen NLL")
    beta: float = Field(gt=0, description="β: temperature of the preference term")
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"] = Field(
        description="sigmoid / hinge on summed, ipo / simpo / alphapo on averaged log-probs"
    )
    cpo_alpha: float = Field(ge=0, description="weight of the chosen NLL (0 for alphapo)")
    simpo_gamma: float = Field(description="simpo / alphapo: target margin γ")
    label_smoothing: float = Field(ge=0, lt=0.5, description="ε: sigmoid, simpo, alphapo")
    alpha: float = Field(description="AlphaPO's α: reward (1 − p^(−α))/α (0: log p)")

    @model_validator(mode="after")
    def _loss_options(self) -> CPOTrainer:
        check_cpo_options(
            self.loss_type, self.beta, self.label_smoothing, self.cpo_alpha, self.alpha
        )
        return self


class KTOTrainer(Section):
    name: Literal["kto"] = Field(description="KTO on unpaired data (prompt, completion, label)")
    beta: float = Field(gt=0, description="β")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(description="kto | apo_zero_unpaired")
    desirable_weight: float = Field(gt=0, description="λ_D: weight of desirable examples")
    undesirable_weight: float = Field(gt=0, description="λ_U: weight of undesirable examples")


class QRPOTrainer(Section):
    name: Literal["qrpo"] = Field(description="quantile reward policy optimisation")
    beta: float = Field(gt=0, description="β")
    transform: Literal["identity", "log"] = Field(description="reward = q or log q")
    approx_log_partition: bool = Field(description="β·logZ ≈ β·log β + 1 (small β only)")
    beta_length_normalized: bool = Field(description="β / completion length")
    loss_length_normalized: bool = Field(description="squared residual / completion length")
    beta_cap: float | None = Field(gt=0, description="cap on the (normalised) β; warns if binding")
    min_quantile: float | None = Field(gt=0, lt=1, description="log transform: floor on q")

    @model_validator(mode="after")
    def _loss_options(self) -> QRPOTrainer:
        # losses.qrpo.check_qrpo_options: min_quantile only with transform=log, approx only
        # with identity.
        check_qrpo_options(
            self.beta, self.transform, self.approx_log_partition, self.beta_cap, self.min_quantile
        )
        return self


class RewardTrainer(Section):
    name: Literal["reward"] = Field(description="a reward model: Bradley–Terry on pairs")
    center_rewards_coefficient: float | None = Field(
        ge=0, description="weight of (r_chosen + r_rejected)² (null: none)"
    )


class RewardSpec(Section):
    """One weighted reward of ``train_online``: a function, or a reward model."""

    function: str | None = Field(
        description="a registered reward (exact_match, tiny_task_partial, ...) or pkg.mod:fn"
    )
    module: str | None = Field(default=None, description="module to import (registrations)")
    model: dict | None = Field(
        default=None,
        description="a one-label sequence classifier: {model_name_or_path, chat_template, ...}",
    )
    weight: float = Field(default=1.0, description="weight in the total reward")
    name: str | None = Field(default=None, description="metric name (default: the function)")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of function and model")
        if self.model is not None and not self.model.get("model_name_or_path"):
            raise ValueError("model needs model_name_or_path")
        return self


class OnlineTrainerBase(Section):
    num_generations: PositiveInt = Field(description="completions sampled per prompt (a group)")
    num_iterations: PositiveInt = Field(description="optimizer steps per generation batch (μ)")
    epsilon: float = Field(gt=0, lt=1, description="clip range below (and above, unless set)")
    epsilon_high: float | None = Field(gt=0, description="clip range above (DAPO's clip-higher)")
    beta: float = Field(ge=0, description="KL coefficient against the reference (k3 estimator)")
    scale_rewards: Literal["group", "none"] = Field(
        description="advantages divided by the group's reward std (group) or not (none)"
    )
    rewards: list[RewardSpec] = Field(min_length=1, description="weighted rewards")


class GRPOTrainer(OnlineTrainerBase):
    name: Literal["grpo"] = Field(description="group relative policy optimisation")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "gspo"] = Field(
        description="normaliser / ratio: grpo, dapo, dr_grpo, gspo (sequence-level ratio)"
    )

    @model_validator(mode="after")
    def _groups(self) -> GRPOTrainer:
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2 (advantages within a group)")
        return self


class RLOOTrainer(OnlineTrainerBase):
    name: Literal["rloo"] = Field(description="REINFORCE leave-one-out (KL in the reward)")

    @model_validator(mode="after")
    def _groups(self) -> RLOOTrainer:
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2 (the leave-one-out baseline)")
        return self


OnlineTrainers = Annotated[GRPOTrainer | RLOOTrainer, Field(discriminator="name")]
SFTTrainers = Annotated[
    SFTTrainer | PLWTrainer | LNPLWTrainer | IRLTrainer, Field(discriminator="name")
]
PreferenceTrainers = Annotated[
    DPOTrainer | CPOTrainer | KTOTrainer | QRPOTrainer, Field(discriminator="name")
]
