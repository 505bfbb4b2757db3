"""``trainer`` sections: one schema per trainer choice, told apart by ``trainer.name``.

``train_sft`` takes the SFT family, ``train_preference`` the preference family; each schema
lists exactly the options of its loss (a key of another trainer is refused).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from post_training.losses import dpo
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
    loss_type: str = Field(description="a DPO-family loss type (post_training.losses.dpo)")
    label_smoothing: float = Field(
        ge=0, lt=1, description="ε: sigmoid (cDPO), robust, simpo (< 0.5); exo_pair (> 0)"
    )
    nll_weight: float = Field(ge=0, description="+ weight · NLL of the chosen reply (RPO)")
    simpo_gamma: float = Field(description="simpo: target margin γ")
    orpo_alpha: float = Field(ge=0, description="orpo: weight λ of the odds-ratio term")
    discopop_tau: float = Field(gt=0, description="discopop: temperature of the mixing sigmoid")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        known = dpo.LOSS_TYPES  # read from the loss table now: a new entry is accepted
        if value not in known:
            raise ValueError(f"must be one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _loss_options(self) -> DPOTrainer:
        # The rules of the loss type's table entry (losses.dpo.check_dpo_options), e.g.
        # exo_pair needs 0 < label_smoothing < 1, orpo nll_weight=0.
        dpo.check_dpo_options(
            self.loss_type, self.beta, self.label_smoothing, self.discopop_tau, self.nll_weight
        )
        return self


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


SFTTrainers = Annotated[
    SFTTrainer | PLWTrainer | LNPLWTrainer | IRLTrainer, Field(discriminator="name")
]
PreferenceTrainers = Annotated[DPOTrainer | QRPOTrainer, Field(discriminator="name")]
