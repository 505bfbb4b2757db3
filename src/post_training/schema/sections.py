"""Sections shared by several entrypoints: setup (run dirs, seed, trackers, resuming), model,
data options, dataset, PEFT (``model_args``) and the launch (``accelerate``) record."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from post_training.schema.base import OpenSection, Section

TorchDtype = Literal["float32", "bfloat16", "float16", "auto"]
AttnImplementation = Literal[
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
]


class Debug(Section):
    enabled: bool = Field(description="true: a few steps into outputs-debug/ (never mixed)")
    max_steps: PositiveInt = Field(description="optimizer steps of a debug run")
    traceback: bool = Field(
        description="true: a project error (config, data) shows its traceback "
        "(also HYDRA_FULL_ERROR=1)"
    )


class Resuming(Section):
    resume: bool = Field(
        description="true: checkpoints go to the config-hash dir; a re-run resumes"
    )
    dir: str | None = Field(
        description="explicit resume dir (null: outputs_dir/checkpoints/<hash>)"
    )
    allow_config_change: bool = Field(
        description="true: start a new hash dir even if the job holds checkpoints of another config"
    )
    ignore_keys: list[str] = Field(description="dotted keys that may change between resumptions")
    lock: Literal["flock", "heartbeat", "none"] = Field(
        description="one launch per resume target: flock, a heartbeat lock file (filesystems "
        "without a shared flock), or none"
    )
    lock_heartbeat_s: PositiveFloat = Field(description="heartbeat lock: refresh period (s)")
    lock_stale_after_s: PositiveFloat = Field(
        description="heartbeat lock: a lock not refreshed for this long is taken over (s)"
    )
    verify: Literal["sha256", "size"] = Field(
        description="what a checkpoint's manifest checks on resume: sizes and SHA-256, or sizes"
    )
    fresh_start_if_damaged: bool = Field(
        description="true: when every checkpoint is damaged, train from scratch (else an error)"
    )

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> Resuming:
        if self.lock == "heartbeat" and self.lock_stale_after_s <= 2 * self.lock_heartbeat_s:
            raise ValueError(
                f"lock_stale_after_s={self.lock_stale_after_s} must exceed twice "
                f"lock_heartbeat_s={self.lock_heartbeat_s} (a live holder would look stale)"
            )
        return self


class Wandb(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        description="auto: online if WANDB_API_KEY is set, else offline"
    )
    project: str = Field(description="wandb project")
    entity: str | None = Field(description="wandb entity (null: the default)")
    run_name: str = Field(description="wandb run name")
    tags: list[str] = Field(description="wandb tags")


class Setup(Section):
    """Inherited by every entrypoint (``configs/setup.yaml``)."""

    artifacts_dir: str = Field(description="root of outputs (env POST_TRAINING_ARTIFACTS_DIR)")
    artifacts_subdir: str = Field(description="subdir of artifacts_dir (private, shared, ...)")
    job_subdir: str = Field(min_length=1, description="name of the job: its outputs dir")
    entrypoint: str = Field(description="set by each primary config")
    seed: NonNegativeInt = Field(description="global seed: init, data order, sampling")
    outputs_dir: str = Field(description="where the entrypoint's runs and checkpoints go")
    run_dir: str = Field(description="this run's dir (timestamped)")
    debug: Debug
    resuming: Resuming
    wandb: Wandb
    tensorboard: bool = Field(description="also write TensorBoard event files")


class SpecialTokens(Section):
    bos_token: str | None = Field(description="BOS token (null: none)")
    eos_token: str | None = Field(description="EOS / end-of-turn token")
    pad_token: str | None = Field(description="pad token (must differ from EOS)")
    bos_token_id: NonNegativeInt | None = Field(description="expected id of bos_token")
    eos_token_id: NonNegativeInt | None = Field(description="expected id of eos_token")
    pad_token_id: NonNegativeInt | None = Field(description="expected id of pad_token")
    add_bos: bool = Field(description="prepend BOS when the template has none")


class Model(Section):
    name: str = Field(description="short name (output paths)")
    model_name_or_path: str = Field(min_length=1, description="local dir or Hub id")
    tokenizer_name_or_path: str = Field(min_length=1, description="tokenizer dir or Hub id")
    init_from_config: bool = Field(description="true: random init from the config (tiny model)")
    init_seed: NonNegativeInt = Field(description="seed of the random init")
    chat_template: str | dict[str, Any] | None = Field(
        description="null/tokenizer: the tokenizer's Jinja; a registry name, Jinja or a mapping"
    )
    torch_dtype: TorchDtype = Field(description="weights dtype")
    attn_implementation: AttnImplementation = Field(description="transformers attention kernel")
    trust_remote_code: Literal[False] = Field(description="remote code is never loaded")
    max_seq_length: int = Field(ge=2, description="longest tokenized example (tokens)")
    special_tokens: SpecialTokens


class DataOptions(Section):
    truncation: Literal["drop", "truncate"] = Field(
        description="over-long SFT examples (tail cut) and preference pairs (prompt head cut)"
    )
    non_alternating_roles: Literal["merge", "drop", "error"] = Field(
        description="consecutive same-role messages"
    )
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        description="which assistant turns are trained (the others are context)"
    )
    cache: bool = Field(description="cache tokenized splits")
    cache_dir: str = Field(description="where the cache lives")


SplitSpec = dict[str, Any]
"""A source (``{path, transform, ...}``) or a mixture (``{sources: [...]}``) spec; its keys are
checked by :func:`post_training.data_sft.mixing.parse_spec` in the same validation pass."""


class Dataset(Section):
    name: str = Field(description="dataset name (output paths, eval file names)")
    train: SplitSpec = Field(description="a source or mixture spec")
    eval: SplitSpec | None = Field(
        description="a source or mixture spec, {from_train: {size|fraction, ...}}, or null"
    )
    answer_field: str | None = Field(default=None, description="column of the expected answer")
    task_field: str | None = Field(default=None, description="column for per-task accuracy")
    exact_match: bool = Field(
        default=True,
        description="false: free-form replies (chat data), where an exact-match score means "
        "nothing; evaluation.at_end defaults to this",
    )
    max_train_examples: PositiveInt | None = Field(description="cap on train rows (null: all)")
    max_eval_examples: PositiveInt | None = Field(description="cap on eval rows (null: all)")
    unpair: bool = Field(
        default=False,
        description="trainer=kto: split each preference pair into two unpaired examples "
        "(chosen: label true, rejected: label false)",
    )

    @field_validator("train")
    @classmethod
    def _train_is_a_spec(cls, value: SplitSpec) -> SplitSpec:
        if "path" not in value and "sources" not in value:
            raise ValueError("must be a source ({path: ...}) or a mixture ({sources: [...]})")
        return value


class ModelArgs(Section):
    """LoRA / QLoRA through PEFT (TRL ``ModelConfig`` keys)."""

    use_peft: bool = Field(description="train LoRA adapters instead of all weights")
    lora_r: PositiveInt = Field(description="LoRA rank")
    lora_alpha: float = Field(gt=0, description="LoRA scaling numerator")
    lora_dropout: float = Field(ge=0, lt=1, description="dropout on the LoRA path")
    lora_target_modules: str | list[str] = Field(description="all-linear or module names")
    lora_modules_to_save: list[str] | None = Field(description="modules trained in full")
    use_rslora: bool = Field(description="rank-stabilised LoRA scaling")
    load_in_4bit: bool = Field(description="QLoRA: NF4 base weights (CUDA + bitsandbytes)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(description="4-bit quantisation type")
    use_bnb_nested_quant: bool = Field(description="double quantisation of the 4-bit constants")
    save_merged_model: bool = Field(description="final-model/ = adapter merged into the base")

    @model_validator(mode="after")
    def _qlora_needs_peft(self) -> ModelArgs:
        if self.load_in_4bit and not self.use_peft:
            raise ValueError(
                "model_args.load_in_4bit=true needs model_args.use_peft=true "
                "(4-bit weights cannot be trained in full)"
            )
        return self


class Accelerate(OpenSection):
    """The accelerate launch file recorded in the config (``accelerate=<name>``); its keys are
    accelerate's."""
