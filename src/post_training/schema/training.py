"""``training_args`` (the loop, optimiser, schedule, checkpoints) and ``evaluation``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from post_training.schema.base import Section

LENGTH_KEYS = ("max_steps", "num_train_epochs", "num_training_samples", "num_training_tokens")

SchedulerName = Literal[
    # transformers.trainer_utils.SchedulerType (a test keeps the two equal)
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
]


class TrainingArgs(Section):
    """What every trainer's loop reads."""

    max_steps: PositiveInt | None = Field(description="training length: optimizer steps")
    num_train_epochs: float | None = Field(gt=0, description="training length: epochs")
    num_training_samples: PositiveInt | None = Field(description="training length: examples")

    per_device_train_batch_size: PositiveInt = Field(description="micro-batch per rank")
    per_device_eval_batch_size: PositiveInt = Field(description="eval batch per rank")
    gradient_accumulation_steps: PositiveInt = Field(description="micro-batches per step")
    group_by_length: bool = Field(description="batches of similar lengths (seeded order)")
    learning_rate: float = Field(gt=0, description="peak learning rate")
    lr_scheduler_type: SchedulerName = Field(description="transformers scheduler name")
    warmup_ratio: float = Field(ge=0, le=1, description="warm-up share of the steps")
    warmup_steps: NonNegativeInt | None = Field(description="warm-up steps (overrides the ratio)")
    weight_decay: float = Field(ge=0, description="AdamW weight decay (not on norms, biases)")
    adam_beta1: float = Field(ge=0, lt=1, description="AdamW β1")
    adam_beta2: float = Field(ge=0, lt=1, description="AdamW β2")
    adam_epsilon: float = Field(gt=0, description="AdamW ε")
    max_grad_norm: float | None = Field(ge=0, description="gradient clipping (0/null: none)")
    loss_chunk_size: NonNegativeInt = Field(description="LM-head rows at a time (0: full logits)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(description="autocast (GPU)")
    gradient_checkpointing: bool = Field(description="recompute activations in backward")
    torch_compile: bool = Field(description="torch.compile the transformer body (dynamic shapes)")
    ddp_timeout: PositiveInt = Field(
        description="seconds a rank waits in a collective (e.g. while the main one tokenizes)"
    )

    logging_steps: PositiveInt = Field(description="log every this many steps")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        description="no | steps (every eval_steps) | epoch; evaluates at the end too"
    )
    eval_steps: PositiveInt | None = Field(description="eval interval (null: only at the end)")
    save_steps: PositiveInt | None = Field(description="full (resumable) checkpoint interval")
    save_total_limit: PositiveInt | None = Field(description="full checkpoints kept")
    inference_checkpoint_steps: PositiveInt | None = Field(
        description="model + tokenizer only, kept (null: none)"
    )
    dataloader_num_workers: NonNegativeInt = Field(description="kept for TRL-style configs")

    def length_keys(self) -> tuple[str, ...]:
        return tuple(k for k in LENGTH_KEYS if k in type(self).model_fields)

    @model_validator(mode="after")
    def _exactly_one_length(self) -> TrainingArgs:
        keys = self.length_keys()
        chosen = [k for k in keys if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of training_args."
                + ", training_args.".join(keys)
                + f" (the others null); got {', '.join(chosen) or 'none'}"
            )
        return self

    @property
    def length_key(self) -> str:
        """The one training-length key that is set."""
        return next(k for k in self.length_keys() if getattr(self, k) is not None)


class SFTTrainingArgs(TrainingArgs):
    num_training_tokens: PositiveInt | None = Field(
        description="training length: tokens (needs packing)"
    )
    packing: bool = Field(description="best-fit-decreasing bins of model.max_seq_length tokens")

    @model_validator(mode="after")
    def _tokens_need_packing(self) -> SFTTrainingArgs:
        if self.num_training_tokens is not None and not self.packing:
            raise ValueError("training_args.num_training_tokens needs training_args.packing=true")
        return self


class PreferenceTrainingArgs(TrainingArgs):
    max_prompt_length: PositiveInt | None = Field(
        description="longest prompt (null: model.max_seq_length - 1); longer is an error"
    )
    packing: bool = Field(
        description="several pairs per row: each micro-batch's pairs in best-fit-decreasing "
        "rows of 2 × model.max_seq_length tokens (false: one pair per padded row)"
    )


HarnessLimit = PositiveInt | Annotated[float, Field(gt=0, lt=1)] | None
"""lm-eval's ``limit``: examples per task, a fraction of each task below 1, or null (all)."""

HarnessBatchSize = PositiveInt | Literal["auto"]
"""lm-eval's batch size: prompts per forward, or ``auto`` (the largest that fits)."""


class Evaluation(Section):
    at_end: bool = Field(description="exact-match accuracy of greedy generations at the end")
    compare_start: bool = Field(
        default=True,
        description="with at_end, from a saved checkpoint (model.init_from_config=false): "
        "also the start model's accuracy, printed and logged beside the final one",
    )
    max_new_tokens: PositiveInt = Field(description="generation length")
    batch_size: PositiveInt = Field(description="prompts per generate call")
    max_examples: PositiveInt | None = Field(description="cap on evaluated examples")
    harness_every: NonNegativeInt = Field(
        description="lm-eval harness every N optimizer steps and at the last (0: off)"
    )
    harness_tasks: list[str] = Field(description="lm-eval tasks of harness_every: [tiny_tasks]")
    harness_limit: HarnessLimit = Field(description="examples per harness task (null: all)")
    harness_batch_size: HarnessBatchSize = Field(description="harness prompts per batch (or auto)")

    @field_validator("harness_tasks")
    @classmethod
    def _tasks_when_on(cls, value: list[str], info: ValidationInfo) -> list[str]:
        every = info.data.get("harness_every")
        if every and not value:
            raise ValueError(
                f"must name at least one lm-eval task when evaluation.harness_every={every} "
                "(> 0), e.g. evaluation.harness_tasks=[tiny_tasks]"
            )
        return value
