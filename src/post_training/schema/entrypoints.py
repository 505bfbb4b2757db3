"""One root schema per entrypoint: which sections it has, and the rules that cross them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from post_training.schema.base import Section
from post_training.schema.sections import (
    Accelerate,
    DataOptions,
    Dataset,
    Model,
    ModelArgs,
    Setup,
    TorchDtype,
)
from post_training.schema.trainers import (
    OnlineTrainers,
    PreferenceTrainers,
    RewardTrainer,
    SFTTrainers,
)
from post_training.schema.training import (
    Evaluation,
    HarnessBatchSize,
    HarnessLimit,
    PreferenceTrainingArgs,
    SFTTrainingArgs,
    TrainingArgs,
)


# ---------------------------------------------------------------------------------- training
class TrainSFT(Setup):
    model: Model
    dataset: Dataset
    data: DataOptions
    trainer: SFTTrainers
    accelerate: Accelerate
    model_args: ModelArgs
    training_args: SFTTrainingArgs
    evaluation: Evaluation


class Reference(Section):
    model_name_or_path: str | None = Field(
        description="null: the policy's initial weights (LoRA: the policy without adapters)"
    )
    precompute: bool = Field(description="one pass before training, cached (data.cache_dir)")


class PreferenceEvaluation(Evaluation):
    dataset: Dataset | None = Field(description="SFT-format dataset for the end accuracy")


class TrainPreference(Setup):
    model: Model
    dataset: Dataset
    data: DataOptions
    trainer: PreferenceTrainers
    accelerate: Accelerate
    reference: Reference
    model_args: ModelArgs
    training_args: PreferenceTrainingArgs
    evaluation: PreferenceEvaluation

    @model_validator(mode="after")
    def _qlora_reference(self) -> TrainPreference:
        if self.model_args.load_in_4bit and self.reference.model_name_or_path:
            raise ValueError(
                "reference.model_name_or_path with model_args.load_in_4bit: use the "
                "adapter-less policy as reference (reference.model_name_or_path=null)"
            )
        return self

    @model_validator(mode="after")
    def _unpair_is_for_kto(self) -> TrainPreference:
        if self.dataset.unpair and self.trainer.name != "kto":
            raise ValueError(
                f"dataset.unpair=true with trainer={self.trainer.name}: unpairing makes KTO's "
                "unpaired examples; the pairwise trainers train on the pairs themselves"
            )
        return self

    @model_validator(mode="after")
    def _synced_reference(self) -> TrainPreference:
        # TR-DPO mixes the policy into a frozen reference model scored live.
        if not getattr(self.trainer, "sync_ref_model", False):
            return self
        if self.reference.precompute:
            raise ValueError(
                "trainer.sync_ref_model=true with reference.precompute=true: "
                "reference.precompute=true fixes the reference log-probs once; TR-DPO needs "
                "the reference scored live (reference.precompute=false)"
            )
        if self.model_args.use_peft and not self.reference.model_name_or_path:
            raise ValueError(
                "trainer.sync_ref_model=true with model_args.use_peft=true: a PEFT policy's "
                "reference is its base model, which stays frozen; give a "
                "reference.model_name_or_path or train without PEFT"
            )
        return self


class TrainReward(Setup):
    model: Model
    dataset: Dataset
    data: DataOptions
    trainer: RewardTrainer
    accelerate: Accelerate
    model_args: ModelArgs
    training_args: PreferenceTrainingArgs

    @model_validator(mode="after")
    def _pairs_only(self) -> TrainReward:
        if self.dataset.unpair:
            raise ValueError(
                "dataset.unpair=true with train_reward: a reward model learns from pairs"
            )
        return self


class OnlineGeneration(Section):
    temperature: float = Field(gt=0, description="sampling temperature")
    top_p: float = Field(gt=0, le=1, description="nucleus sampling mass")
    top_k: NonNegativeInt = Field(description="top-k sampling (0: off)")
    max_new_tokens: PositiveInt = Field(description="completion length (Dr. GRPO's constant)")
    batch_size: PositiveInt = Field(description="prompts per generate call")


class TrainOnline(Setup):
    model: Model
    dataset: Dataset
    data: DataOptions
    trainer: OnlineTrainers
    accelerate: Accelerate
    model_args: ModelArgs
    training_args: TrainingArgs
    generation: OnlineGeneration
    evaluation: PreferenceEvaluation

    @model_validator(mode="after")
    def _no_quantized_reference(self) -> TrainOnline:
        if self.model_args.load_in_4bit and not self.model_args.use_peft:
            raise ValueError("model_args.load_in_4bit (QLoRA) needs model_args.use_peft=true")
        return self


# ---------------------------------------------------------------------------------- others
class HarnessOptions(Section):
    tasks: list[str] = Field(description="lm-eval tasks, groups or tags (empty: no harness)")
    batch_size: HarnessBatchSize = Field(description="prompts per batch, or auto")
    device: str = Field(
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto: cuda if available, else cpu"
    )
    limit: HarnessLimit = Field(description="examples per task (null: all; < 1: a fraction)")
    num_fewshot: NonNegativeInt | None = Field(description="null: each task's default")
    apply_chat_template: bool = Field(description="prompts through the checkpoint's template")
    include_path: str | list[str] | None = Field(description="dirs of local task YAMLs")
    output_file: str | None = Field(description="null: <model_path>/eval-harness.json")


class Evaluate(Setup):
    dataset: Dataset
    model_path: str = Field(min_length=1, description="a checkpoint dir the trainers wrote")
    exact_match: bool = Field(description="exact match on dataset (false: only harness.tasks)")
    output_file: str | None = Field(description="null: <model_path>/eval-<dataset.name>.json")
    max_new_tokens: PositiveInt = Field(description="generation length")
    batch_size: PositiveInt = Field(description="prompts per generate call")
    max_examples: PositiveInt | None = Field(description="cap on evaluated examples")
    torch_dtype: TorchDtype = Field(description="weights dtype")
    harness: HarnessOptions

    @model_validator(mode="after")
    def _something_to_do(self) -> Evaluate:
        if not self.exact_match and not self.harness.tasks:
            raise ValueError(
                "exact_match=false with harness.tasks=[]: nothing to evaluate (name lm-eval "
                "tasks, e.g. harness.tasks=[tiny_tasks])"
            )
        return self


class MergeMethod(Section):
    method: str = Field(description="linear, task_arithmetic, ties, dare_ties, ... (mergekit)")
    base_model: str | None = Field(description="the base checkpoint (t = 0 end for slerp)")
    models: list[Any] = Field(min_length=1, description="[dir, ...] or [{path, weight, ...}]")
    model_parameters: dict[str, Any] = Field(description="per model: one value or a list")
    parameters: dict[str, Any] = Field(description="method-level parameters")


class ModelMerging(Setup):
    model_merging: MergeMethod
    name: str = Field(min_length=1, description="directory name of the merged model")
    output_dir: str = Field(description="where the merged model goes")
    overwrite: bool = Field(description="replace an existing output_dir once complete")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(description="merge arithmetic")
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        description="saved weights dtype (null: dtype)"
    )
    copy_tokenizer: bool = Field(description="copy the tokenizer and chat template")
    write_model_card: bool = Field(description="mergekit's README.md and config")
    trust_remote_code: Literal[False] = Field(description="remote code is never loaded")
    lazy_unpickle: bool = Field(description="mergekit's lazy loader for .bin checkpoints")
    low_cpu_memory: bool = Field(description="keep intermediates on the accelerator")
    device: Literal["cpu", "cuda", "auto"] = Field(description="where the arithmetic runs")


class EvalSplit(Section):
    size: PositiveInt | None = Field(default=None, description="eval rows")
    fraction: float | None = Field(default=None, gt=0, lt=1, description="eval share")
    stratify_by: str | None = Field(default=None, description="column to stratify by")
    seed: NonNegativeInt | None = Field(default=None, description="split seed")


class DatasetMixture(Setup):
    name: str = Field(min_length=1, description="dataset name (output dir)")
    mixture: dict[str, Any] = Field(description="{sources: [...], seed, total, upsample, shuffle}")
    eval_split: EvalSplit | None = Field(description="{size | fraction, stratify_by} or null")
    output_dir: str = Field(description="where the DatasetDict goes")
    overwrite: bool = Field(description="replace an existing output_dir (atomically)")


class DatasetSplit(Setup):
    name: str = Field(min_length=1, description="dataset name (output dir)")
    input: dict[str, Any] = Field(description="a source or mixture spec")
    eval_size: PositiveInt | None = Field(description="eval rows (or eval_fraction)")
    eval_fraction: float | None = Field(gt=0, lt=1, description="eval share (or eval_size)")
    stratify_by: str | None = Field(description="a column, or null")
    output_dir: str = Field(description="where the DatasetDict goes")
    overwrite: bool = Field(description="replace an existing output_dir (atomically)")

    @model_validator(mode="after")
    def _one_size(self) -> DatasetSplit:
        if (self.eval_size is None) == (self.eval_fraction is None):
            raise ValueError("set exactly one of eval_size and eval_fraction")
        return self


class DataInspect(Setup):
    model: Model
    dataset: Dataset
    data: DataOptions
    mode: Literal["samples", "token_stats"] = Field(description="what to print")
    split: Literal["train", "eval"] = Field(description="which split")
    num_samples: PositiveInt = Field(description="rows printed in samples mode")


# ---------------------------------------------------------------------------------- alignment
class Alignment(Section):
    dir: str = Field(description="root of the chain's stage outputs")
    split: Literal["train", "eval"] = Field(description="the dataset split processed")
    max_new_tokens: PositiveInt = Field(description="longest reference completion")


class Partition(Section):
    index: NonNegativeInt = Field(description="this task's partition (SLURM array index)")
    count: PositiveInt = Field(description="number of partitions")

    @model_validator(mode="after")
    def _index_in_range(self) -> Partition:
        if self.index >= self.count:
            raise ValueError(
                f"partition.index must be < partition.count ({self.index} >= {self.count})"
            )
        return self


class AlignmentStage(Setup):
    model: Model
    dataset: Dataset
    data: DataOptions
    accelerate: Accelerate
    alignment: Alignment
    partition: Partition
    output_dir: str = Field(description="this stage's output dir")
    overwrite: bool = Field(description="replace partitions written with another config")


class ChainedStage(AlignmentStage):
    """A stage that reads the previous stage's output."""

    input: str = Field(description="the previous stage's dir")


class FilterOptions(Section):
    max_prompt_length: PositiveInt | None = Field(description="null: model.max_seq_length")


class FilterDatasetForModel(AlignmentStage):
    filter: FilterOptions


class Generation(Section):
    backend: Literal["auto", "hf", "vllm"] = Field(description="generation backend")
    num_completions: PositiveInt = Field(description="completions per prompt")
    temperature: float = Field(ge=0, description="0: greedy")
    top_p: float = Field(gt=0, le=1, description="nucleus sampling")
    top_k: NonNegativeInt = Field(description="0: off")
    max_new_tokens: PositiveInt = Field(description="completion length")
    seed: NonNegativeInt = Field(description="sampling seed (per row id and k)")
    batch_size: PositiveInt = Field(description="prompts per generate call")


class GenerateRefCompletions(ChainedStage):
    generation: Generation


class RefLogprobs(Section):
    completions: bool = Field(description="also each reference completion")
    max_prompt_length: PositiveInt | None = Field(description="null: model.max_seq_length - 1")
    batch_size: PositiveInt = Field(description="rows per forward")
    loss_chunk_size: NonNegativeInt = Field(description="LM-head rows at a time (0: full)")


class ComputeRefLogprobs(ChainedStage):
    ref_logprobs: RefLogprobs


class RewardModel(Section):
    model_name_or_path: str | None = Field(description="a one-label sequence classifier")
    tokenizer_name_or_path: str | None = Field(description="null: the model's")
    chat_template: str | dict[str, Any] | None = Field(description="null: the tokenizer's own")
    torch_dtype: TorchDtype = Field(description="weights dtype")
    batch_size: PositiveInt = Field(description="conversations per forward")
    max_length: PositiveInt | None = Field(description="truncate longer conversations")


class Reward(Section):
    function: str | None = Field(description="a registered reward or pkg.mod:fn")
    module: str | None = Field(description="a module to import first")
    model: RewardModel

    @model_validator(mode="after")
    def _function_or_model(self) -> Reward:
        if bool(self.function) == bool(self.model.model_name_or_path):
            raise ValueError(
                "set exactly one of reward.function and reward.model.model_name_or_path"
            )
        return self


class ComputeRewards(ChainedStage):
    reward: Reward


class PrepareInput(Section):
    name: str = Field(description="input name")
    path: str = Field(description="a stage dir or rows file")
    weight: float | None = Field(default=None, ge=0, description="share of total")
    fraction: float | None = Field(default=None, ge=0, description="share of the input's rows")
    count: NonNegativeInt | None = Field(default=None, description="rows from this input")


class Prepare(Section):
    inputs: list[PrepareInput] = Field(min_length=1, description="inputs mixed by amount")
    pairs: list[Literal["offline", "best_worst", "answer_worst"]] = Field(
        min_length=1, description="pair kinds"
    )
    min_reward_margin: float = Field(ge=0, description="skip pairs whose rewards differ by ≤ this")
    require_ref_logps: bool = Field(description="refuse pairs without reference log-probs")
    total: PositiveInt | None = Field(description="rows shared by weighted inputs")
    seed: NonNegativeInt = Field(description="mixing seed")
    shuffle: bool = Field(description="shuffle the result")


class PrepareTrainDataset(AlignmentStage):
    prepare: Prepare


class MergePartitions(AlignmentStage):
    stage: str = Field(min_length=1, description="the stage whose partitions are merged")
    stage_dir: str = Field(description="that stage's dir")


SCHEMAS: dict[str, type[Setup]] = {
    "train_sft": TrainSFT,
    "train_preference": TrainPreference,
    "train_reward": TrainReward,
    "train_online": TrainOnline,
    "evaluate": Evaluate,
    "model_merging": ModelMerging,
    "dataset_mixture": DatasetMixture,
    "dataset_split": DatasetSplit,
    "data_inspect": DataInspect,
    "filter_dataset_for_model": FilterDatasetForModel,
    "generate_ref_completions": GenerateRefCompletions,
    "compute_ref_logprobs": ComputeRefLogprobs,
    "compute_rewards": ComputeRewards,
    "prepare_train_dataset": PrepareTrainDataset,
    "merge_partitions": MergePartitions,
}
"""The schema of each entrypoint, by its ``entrypoint`` key."""

CONFIG_NAMES: dict[str, str] = {
    "train_sft": "train-sft",
    "train_preference": "train-preference",
    "train_reward": "train-reward",
    "train_online": "train-online",
    "evaluate": "evaluate",
    "model_merging": "model-merging",
    "dataset_mixture": "dataset-mixture",
    "dataset_split": "dataset-split",
    "data_inspect": "data-inspect",
    "filter_dataset_for_model": "filter-dataset-for-model",
    "generate_ref_completions": "generate-ref-completions",
    "compute_ref_logprobs": "compute-ref-logprobs",
    "compute_rewards": "compute-rewards",
    "prepare_train_dataset": "prepare-train-dataset",
    "merge_partitions": "merge-partitions",
}
"""The primary config (``configs/<name>.yaml``) of each entrypoint."""
