"""Composition of every config-group choice, config errors, hashing and drift detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from post_training.errors import ConfigError
from post_training.schema import check
from post_training.utils.config import CONFIGS_DIR, config_hash, diff_configs, to_container
from post_training.utils.run import setup_run

from .conftest import run_entrypoint

GROUPS = ("model", "dataset", "trainer", "accelerate", "preset")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / group).glob("*.yaml"))


def compose_cfg(overrides: list[str], name: str = "train-sft"):
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize(
    "group,choice", [(g, c) for g in GROUPS for c in choices(g)], ids=lambda x: str(x)
)
def test_every_group_choice_composes_and_resolves(group: str, choice: str, tmp_path: Path) -> None:
    entrypoints = {"dpo": "train-preference", "qrpo": "train-preference",
                   "cpo": "train-preference", "kto": "train-preference",
                   "reward": "train-reward", "grpo": "train-online",
                   "rloo": "train-online"}  # fmt: skip
    name = entrypoints.get(choice, "train-sft") if group == "trainer" else "train-sft"
    cfg = compose_cfg([f"{group}={choice}", f"artifacts_dir={tmp_path}"], name)
    resolved = to_container(cfg)
    assert resolved["entrypoint"] == name.replace("-", "_")
    check(resolved)  # and validates against the entrypoint's schema
    if group == "model":
        model = resolved["model"]
        assert model["trust_remote_code"] is False
        special = model["special_tokens"]
        assert special["pad_token"] != special["eos_token"], "pad must differ from eos"
        assert model["torch_dtype"] in {"float32", "bfloat16", "float16"}
    if group == "accelerate":
        assert "distributed_type" in resolved["accelerate"]


def test_evaluate_config_composes(tmp_path: Path) -> None:
    cfg = compose_cfg([f"artifacts_dir={tmp_path}", "model_path=/x"], name="evaluate")
    assert to_container(cfg)["dataset"]["name"] == "tiny-tasks"


def test_default_run_dir_layout(tmp_path: Path) -> None:
    cfg = to_container(compose_cfg([f"artifacts_dir={tmp_path}"]))
    run_dir = Path(cfg["run_dir"])
    assert run_dir.parent == tmp_path / "private/outputs/train_sft/dev/runs"
    debug = to_container(compose_cfg([f"artifacts_dir={tmp_path}", "debug.enabled=true"]))
    assert Path(debug["run_dir"]).parent == tmp_path / "private/outputs-debug/train_sft/dev/runs"


def test_unknown_key_and_choice_fail_with_hydra_errors() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["training_args.not_a_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model=not-a-model"])


def test_cfg_job_prints_composed_config(artifacts: Path) -> None:
    proc = run_entrypoint("train_sft", ["--cfg", "job", "model=qwen3-0.6b"], artifacts)
    printed = OmegaConf.create(proc.stdout)
    assert printed.model.name == "qwen3-0.6b"
    assert printed.training_args.learning_rate > 0
    assert not any(artifacts.iterdir()), "--cfg job must not create a run"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["training_args.max_steps=10"], "got max_steps, num_train_epochs"),
        (["training_args.num_train_epochs=null"], "got none"),
        (
            ["training_args.num_train_epochs=null", "training_args.num_training_tokens=1000"],
            "needs training_args.packing=true",
        ),
    ],
)
def test_training_length_must_be_exactly_one(overrides, message, tmp_path: Path) -> None:
    cfg = compose_cfg([f"artifacts_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message):
        check(to_container(cfg))


def test_two_training_lengths_refused_before_anything_is_written(artifacts: Path) -> None:
    proc = run_entrypoint(
        "train_sft", ["training_args.max_steps=3", "wandb.mode=disabled"], artifacts, check=False
    )
    assert proc.returncode != 0
    assert "set exactly one of training_args.max_steps" in proc.stderr
    assert not list(artifacts.rglob("checkpoint-*"))
    frozen = [p for p in artifacts.rglob("config.yaml") if p.parent.name != ".hydra"]
    assert not frozen, "no run is frozen (only Hydra's own record of the failed call)"


def test_config_hash_ignores_only_ignored_keys() -> None:
    a = {"x": 1, "resuming": {"resume": True}, "t": {"lr": 1.0, "logging_steps": 5}}
    b = {"x": 1, "resuming": {"resume": False}, "t": {"lr": 1.0, "logging_steps": 9}}
    ignore = ["resuming", "t.logging_steps"]
    assert config_hash(a, ignore) == config_hash(b, ignore)
    c = {**a, "t": {"lr": 2.0, "logging_steps": 5}}
    assert config_hash(a, ignore) != config_hash(c, ignore)
    assert diff_configs(a, c, ignore) == {"t.lr": (1.0, 2.0)}


def test_config_drift_is_refused_naming_every_key(tmp_path: Path) -> None:
    base = [f"artifacts_dir={tmp_path}", "resuming.resume=true"]
    first = setup_run(compose_cfg(base))
    assert first.checkpoint_dir.parent == tmp_path / "private/outputs/train_sft/dev/checkpoints"
    # Nothing to protect until a checkpoint is complete: another config may still start.
    other = setup_run(compose_cfg([*base, "training_args.learning_rate=0.5"]))
    assert other.checkpoint_dir != first.checkpoint_dir
    (first.checkpoint_dir / "checkpoint-1").mkdir()
    # Ignored keys may change: same resume target.
    again = setup_run(compose_cfg([*base, "training_args.logging_steps=3"]))
    assert again.checkpoint_dir == first.checkpoint_dir
    changed = [*base, "training_args.learning_rate=0.1", "training_args.adam_beta2=0.9"]
    with pytest.raises(ConfigError) as err:
        setup_run(compose_cfg(changed))
    assert "training_args.learning_rate" in str(err.value)
    assert "training_args.adam_beta2" in str(err.value)
    allowed = setup_run(compose_cfg([*changed, "resuming.allow_config_change=true"]))
    assert allowed.checkpoint_dir != first.checkpoint_dir


def test_offline_by_default_unless_explicitly_enabled() -> None:
    import os
    import subprocess
    import sys

    code = "import post_training, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
    env["HF_HUB_OFFLINE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the CPU refusal; QLoRA needs a GPU"
)
def test_qlora_is_refused_on_cpu_with_the_reason(artifacts: Path) -> None:
    from post_training.modeling.loading import check_quantization

    # From the command line: one error before any run directory or data is written.
    overrides = ["model_args.use_peft=true", "model_args.load_in_4bit=true", "wandb.mode=disabled"]
    proc = run_entrypoint("train_sft", overrides, artifacts, check=False)
    assert proc.returncode != 0
    assert "model_args.load_in_4bit (QLoRA) needs a CUDA GPU" in proc.stderr
    # Only what Hydra writes before the job starts (.hydra/, the job log): no config, data
    # cache, metrics or checkpoints.
    written = [p for p in artifacts.rglob("*") if p.is_file()]
    # (and status.json, marking the launch failed)
    assert all(".hydra" in p.parts or p.suffix == ".log" or p.name == "status.json"
               for p in written), written  # fmt: skip

    with pytest.raises(ConfigError, match="needs a CUDA GPU and the bitsandbytes package"):
        check_quantization({}, {"use_peft": True, "load_in_4bit": True})
    with pytest.raises(ConfigError, match=r"set model_args\.use_peft=true"):
        check_quantization({}, {"use_peft": False, "load_in_4bit": True})
    assert not check_quantization({}, {"use_peft": True, "load_in_4bit": False})


def test_a_missing_model_dir_or_uncached_hub_id_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from post_training.modeling.loading import check_model_path, load_model, load_tokenizer

    model = OmegaConf.to_container(compose_cfg([]).model, resolve=True)
    monkeypatch.chdir(tmp_path)
    for path, line in [
        ("/does/not/exist", "model.tokenizer_name_or_path='/does/not/exist': no such directory"),
        (
            "models/sft/final",  # relative: to the working directory
            f"model.tokenizer_name_or_path='models/sft/final': no such directory "
            f"({tmp_path}/models/sft/final)",
        ),
        (
            "no-such-org/no-such-model",  # a Hub id; HF_HUB_OFFLINE=1 in the tests
            "model.tokenizer_name_or_path='no-such-org/no-such-model' is not in the local "
            "Hugging Face cache",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            load_tokenizer({**model, "tokenizer_name_or_path": path})
        assert str(err.value).startswith(line), str(err.value)
    tokenizer = load_tokenizer(model)
    with pytest.raises(ConfigError, match=r"^model.model_name_or_path='/does/not/exist': no such"):
        load_model({**model, "model_name_or_path": "/does/not/exist"}, tokenizer)
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(ConfigError, match="is a file; give the model's directory"):
        check_model_path("weights.safetensors", "model.model_name_or_path")
    # A Hub id in the offline cache passes.
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--name" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--name" / "refs" / "main").write_text("abc")
    with pytest.raises(ConfigError, match="only partly in the local Hugging Face cache"):
        check_model_path("org/name", "model.model_name_or_path", cache_dir=str(tmp_path / "hub"))
    (snapshot / "model.safetensors").write_text("")  # config + weights: what a model key reads
    check_model_path("org/name", "model.model_name_or_path", cache_dir=str(tmp_path / "hub"))
