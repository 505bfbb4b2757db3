"""The typed config schemas: every default validates, bad values fail naming key, value, rule."""

from __future__ import annotations

import typing

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from post_training.config_reference import composed_defaults, render, rows, trainer_choices
from post_training.errors import ConfigError
from post_training.schema import CONFIG_NAMES, SCHEMAS, check
from post_training.schema.training import SchedulerName
from post_training.utils.config import CONFIGS_DIR, flatten, register_resolvers

register_resolvers()
PLACEHOLDERS = {
    "evaluate": ["model_path=/nowhere"],
    "model-merging": ["model_merging.base_model=/a", "model_merging.models=[/b]"],
}


def composed(name: str, overrides: list[str] = ()) -> dict:
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose(name, overrides=[*PLACEHOLDERS.get(name, []), *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("entrypoint", sorted(SCHEMAS))
def test_every_default_config_validates(entrypoint: str) -> None:
    typed = check(composed(CONFIG_NAMES[entrypoint]))
    assert type(typed) is SCHEMAS[entrypoint]


@pytest.mark.parametrize(
    "name,choice",
    [("train-sft", c) for c in ("sft", "plw", "ln-plw", "irl")]
    + [("train-preference", c) for c in ("dpo", "qrpo", "cpo", "kto")],
)
def test_every_trainer_choice_validates(name: str, choice: str) -> None:
    typed = check(composed(name, [f"trainer={choice}"]))
    assert typed.trainer.name == choice


def test_typed_attributes() -> None:
    typed = check(composed("train-sft", ["training_args.learning_rate=3e-4"]))
    assert typed.training_args.learning_rate == 3e-4
    assert typed.training_args.length_key == "num_train_epochs"
    with pytest.raises(Exception, match="frozen"):
        typed.training_args.learning_rate = 1.0  # type: ignore[misc]


# (primary config, overrides, the key the error names, the value shown, a word of the rule)
BAD = [
    (
        "train-sft",
        ["training_args.learning_rate=abc"],
        "training_args.learning_rate",
        "'abc'",
        "number",
    ),
    (
        "train-sft",
        ["training_args.learning_rate=0"],
        "training_args.learning_rate",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.learning_rate=-1e-3"],
        "training_args.learning_rate",
        "-0.001",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.per_device_train_batch_size=0"],
        "training_args.per_device_train_batch_size",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.per_device_train_batch_size=-4"],
        "training_args.per_device_train_batch_size",
        "-4",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.per_device_train_batch_size=2.5"],
        "training_args.per_device_train_batch_size",
        "2.5",
        "integer",
    ),
    (
        "train-sft",
        ["training_args.gradient_accumulation_steps=0"],
        "training_args.gradient_accumulation_steps",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.per_device_eval_batch_size=0"],
        "training_args.per_device_eval_batch_size",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.num_train_epochs=null", "training_args.max_steps=0"],
        "training_args.max_steps",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.num_train_epochs=0"],
        "training_args.num_train_epochs",
        "0",
        "greater than 0",
    ),
    ("train-sft", ["training_args.max_steps=10"], "training_args", None, "exactly one"),
    ("train-sft", ["training_args.num_train_epochs=null"], "training_args", None, "exactly one"),
    (
        "train-sft",
        ["training_args.num_train_epochs=null", "training_args.num_training_tokens=1000"],
        "training_args",
        None,
        "needs training_args.packing=true",
    ),
    (
        "train-sft",
        ["training_args.warmup_ratio=1.5"],
        "training_args.warmup_ratio",
        "1.5",
        "less than or equal to 1",
    ),
    (
        "train-sft",
        ["training_args.warmup_steps=-1"],
        "training_args.warmup_steps",
        "-1",
        "greater than or equal to 0",
    ),
    (
        "train-sft",
        ["training_args.adam_beta2=1.0"],
        "training_args.adam_beta2",
        "1.0",
        "less than 1",
    ),
    (
        "train-sft",
        ["training_args.adam_epsilon=0"],
        "training_args.adam_epsilon",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.weight_decay=-0.1"],
        "training_args.weight_decay",
        "-0.1",
        "greater than or equal to 0",
    ),
    (
        "train-sft",
        ["training_args.lr_scheduler_type=cosin"],
        "training_args.lr_scheduler_type",
        "'cosin'",
        "'cosine'",
    ),
    (
        "train-sft",
        ["training_args.mixed_precision=fp8"],
        "training_args.mixed_precision",
        "'fp8'",
        "'bf16'",
    ),
    (
        "train-sft",
        ["training_args.eval_strategy=always"],
        "training_args.eval_strategy",
        "'always'",
        "'steps'",
    ),
    (
        "train-sft",
        ["training_args.eval_steps=0"],
        "training_args.eval_steps",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.logging_steps=0"],
        "training_args.logging_steps",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.save_total_limit=0"],
        "training_args.save_total_limit",
        "0",
        "greater than 0",
    ),
    (
        "train-sft",
        ["training_args.loss_chunk_size=-1"],
        "training_args.loss_chunk_size",
        "-1",
        "greater than or equal to 0",
    ),
    (
        "train-sft",
        ["trainer=plw", "trainer.plw_args.prompt_loss_weight=-0.5"],
        "trainer.plw_args.prompt_loss_weight",
        "-0.5",
        "greater than or equal to 0",
    ),
    (
        "train-sft",
        ["trainer=ln-plw", "trainer.plw_args.prompt_loss_weight=2"],
        "trainer.plw_args.prompt_loss_weight",
        "2",
        "less than or equal to 1",
    ),
    (
        "train-sft",
        ["trainer=irl", "trainer.irl_args.gamma=1.5"],
        "trainer.irl_args.gamma",
        "1.5",
        "less than or equal to 1",
    ),
    (
        "train-sft",
        ["trainer=irl", "trainer.irl_args.lambda_td=-1"],
        "trainer.irl_args.lambda_td",
        "-1",
        "greater than or equal to 0",
    ),
    ("train-sft", ["trainer.name=dpo"], "trainer.name", "'dpo'", "'sft'"),
    ("train-sft", ["seed=-1"], "seed", "-1", "greater than or equal to 0"),
    ("train-sft", ["model.torch_dtype=fp32"], "model.torch_dtype", "'fp32'", "'float32'"),
    (
        "train-sft",
        ["model.max_seq_length=1"],
        "model.max_seq_length",
        "1",
        "greater than or equal to 2",
    ),
    ("train-sft", ["model.trust_remote_code=true"], "model.trust_remote_code", "True", "False"),
    (
        "train-sft",
        ["model.attn_implementation=flash"],
        "model.attn_implementation",
        "'flash'",
        "'sdpa'",
    ),
    ("train-sft", ["model_args.lora_r=0"], "model_args.lora_r", "0", "greater than 0"),
    ("train-sft", ["model_args.lora_dropout=1"], "model_args.lora_dropout", "1", "less than 1"),
    (
        "train-sft",
        ["model_args.load_in_4bit=true"],
        "model_args",
        None,
        "needs model_args.use_peft=true",
    ),
    ("train-sft", ["data.truncation=cut"], "data.truncation", "'cut'", "'drop'"),
    ("train-sft", ["wandb.mode=on"], "wandb.mode", "'on'", "'offline'"),
    (
        "train-sft",
        ["dataset.max_train_examples=0"],
        "dataset.max_train_examples",
        "0",
        "greater than 0",
    ),
    ("train-sft", ["dataset.train=oops"], "dataset.train", "'oops'", "dictionary"),
    ("train-preference", ["trainer.beta=0"], "trainer.beta", "0", "greater than 0"),
    ("train-preference", ["trainer.beta=-0.1"], "trainer.beta", "-0.1", "greater than 0"),
    ("train-preference", ["trainer.loss_type=sigmod"], "trainer.loss_type", "'sigmod'", "sigmoid"),
    (
        "train-preference",
        ["trainer.label_smoothing=0.5"],
        "trainer.label_smoothing",
        "0.5",
        "less than 0.5",
    ),
    (
        "train-preference",
        ["trainer=qrpo", "trainer.transform=exp"],
        "trainer.transform",
        "'exp'",
        "'log'",
    ),
    (
        "train-preference",
        ["trainer=qrpo", "trainer.min_quantile=1.5"],
        "trainer.min_quantile",
        "1.5",
        "less than 1",
    ),
    (
        "train-preference",
        ["trainer=qrpo", "trainer.beta_cap=0"],
        "trainer.beta_cap",
        "0",
        "greater than 0",
    ),
    (
        "train-preference",
        ["training_args.max_prompt_length=0"],
        "training_args.max_prompt_length",
        "0",
        "greater than 0",
    ),
    ("evaluate", ["batch_size=0"], "batch_size", "0", "greater than 0"),
    ("model-merging", ["dtype=float64"], "dtype", "'float64'", "'float32'"),
    ("model-merging", ["device=tpu"], "device", "'tpu'", "'cuda'"),
    (
        "dataset-split",
        ["eval_size=10"],
        "<config>",
        None,
        "exactly one of eval_size and eval_fraction",
    ),
    ("dataset-split", ["eval_fraction=1.5"], "eval_fraction", "1.5", "less than 1"),
    ("data-inspect", ["mode=everything"], "mode", "'everything'", "'samples'"),
    (
        "generate-ref-completions",
        ["generation.temperature=-1"],
        "generation.temperature",
        "-1",
        "greater than or equal to 0",
    ),
    (
        "generate-ref-completions",
        ["generation.num_completions=0"],
        "generation.num_completions",
        "0",
        "greater than 0",
    ),
    (
        "generate-ref-completions",
        ["generation.backend=tgi"],
        "generation.backend",
        "'tgi'",
        "'vllm'",
    ),
    (
        "generate-ref-completions",
        ["partition.index=2", "partition.count=2"],
        "partition",
        None,
        "partition.index must be < partition.count",
    ),
    ("compute-rewards", ["reward.function=null"], "reward", None, "exactly one of reward.function"),
    (
        "prepare-train-dataset",
        ["prepare.pairs=[best]"],
        "prepare.pairs[0]",
        "'best'",
        "'best_worst'",
    ),
    (
        "prepare-train-dataset",
        ["prepare.min_reward_margin=-1"],
        "prepare.min_reward_margin",
        "-1",
        "greater than or equal to 0",
    ),
]


@pytest.mark.parametrize("name,overrides,key,value,rule", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_bad_value_names_key_value_and_rule(name, overrides, key, value, rule) -> None:
    with pytest.raises(ConfigError) as info:
        check(composed(name, overrides))
    message = str(info.value)
    assert len(message.splitlines()) == 1, message  # one problem, one line
    expected = key if value is None else f"{key}={value}"
    assert f" {expected}" in message or f" {expected}:" in message, message
    assert rule in message, message


def test_several_problems_one_line_each() -> None:
    bad = ["training_args.learning_rate=abc", "training_args.per_device_train_batch_size=0"]
    with pytest.raises(ConfigError) as info:
        check(composed("train-sft", bad))
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config"
    assert any("training_args.learning_rate='abc'" in line for line in lines[1:])
    assert any("training_args.per_device_train_batch_size=0" in line for line in lines[1:])


def test_keys_of_another_entrypoint_are_refused() -> None:
    cfg = composed("train-preference")
    cfg["training_args"]["num_training_tokens"] = 1000  # SFT's: pairs are counted in pairs
    with pytest.raises(ConfigError, match=r"training_args.num_training_tokens: is not a key"):
        check(cfg)


def test_scheduler_names_are_transformers_names() -> None:
    from transformers.trainer_utils import SchedulerType

    assert set(typing.get_args(SchedulerName)) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("entrypoint", sorted(SCHEMAS))
def test_config_reference_lists_every_composed_key(entrypoint: str) -> None:
    defaults = composed_defaults(entrypoint)
    listed = {key for key, *_ in rows(SCHEMAS[entrypoint], defaults)}
    for key in flatten(defaults):
        if key.startswith("accelerate.") or key.startswith("model_merging.model_parameters"):
            continue  # foreign (accelerate's) / per-method keys: one open mapping each
        parent = key.rsplit(".", 1)[0]
        assert key in listed or parent in listed, f"{entrypoint}: {key} missing"
    text = render(entrypoint, markdown=True)
    assert "| `seed` | `int` | `42` |" in text


def test_config_reference_covers_every_trainer() -> None:
    text = render("train_sft", markdown=False)
    for choice in trainer_choices(SCHEMAS["train_sft"]):
        assert choice in text
    assert "trainer.irl_args.lambda_td" in text


def test_eval_strategy_is_checked() -> None:
    """Moved here from test_sft_losses: the schema owns the rule now."""
    assert (
        check(
            composed("train-sft", ["training_args.eval_strategy=epoch"])
        ).training_args.eval_strategy
        == "epoch"
    )
    typed = check(composed("train-sft", ["training_args.eval_steps=null"]))
    assert typed.training_args.eval_strategy == "steps" and typed.training_args.eval_steps is None
    with pytest.raises(ConfigError, match=r"training_args\.eval_strategy='step': must be"):
        check(composed("train-sft", ["training_args.eval_strategy=step"]))
    with pytest.raises(ConfigError, match=r"training_args\.eval_steps=0: must be greater than 0"):
        check(composed("train-sft", ["training_args.eval_steps=0"]))
