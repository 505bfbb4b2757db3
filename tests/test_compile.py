"""``training_args.torch_compile=true``: the compiled run's losses and gradient norms equal the
eager run's, step by step (inductor's C++ backend on CPU; dynamic shapes, so packed rows of new
lengths do not recompile), for packed SFT and for DPO with a LoRA policy whose reference is the
policy without its adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from post_training.modeling.compile import decoder_of
from post_training.modeling.loading import apply_peft, load_model, load_tokenizer
from post_training.utils.config import CONFIGS_DIR, to_container

from .conftest import QUICK, read_metrics, run_dirs, run_entrypoint

pytestmark = pytest.mark.e2e

CASES = {
    "sft-packed": (
        "train_sft",
        ["training_args.packing=true", "model.max_seq_length=128",
         "dataset.max_train_examples=256"],
    ),
    "dpo-lora": (
        "train_preference",
        ["trainer=dpo", "dataset.max_train_examples=64", "model_args.use_peft=true",
         "model_args.lora_r=4", "model_args.lora_dropout=0.0"],
    ),
}  # fmt: skip


def _steps(artifacts: Path, job: str, entrypoint: str) -> list[dict]:
    (run_dir,) = run_dirs(artifacts, job, entrypoint)
    return [m for m in read_metrics(run_dir) if "grad_norm" in m]


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_run_equals_eager(artifacts: Path, case: str) -> None:
    entrypoint, overrides = CASES[case]
    base = [*QUICK, "training_args.max_steps=3", *overrides]
    run_entrypoint(entrypoint, [*base, "job_subdir=eager"], artifacts)
    compiled = run_entrypoint(
        entrypoint, [*base, "job_subdir=compiled", "training_args.torch_compile=true"], artifacts
    )
    assert "torch.compile: LlamaModel" in compiled.stdout + compiled.stderr
    eager, done = _steps(artifacts, "eager", entrypoint), _steps(artifacts, "compiled", entrypoint)
    assert [m["step"] for m in eager] == [m["step"] for m in done] == [1, 2, 3]
    for a, b in zip(eager, done, strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_the_body_is_found_through_peft() -> None:
    """The compiled module is the transformer body, also inside a PEFT wrapper."""
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        config = to_container(compose("train-sft"))["model"]
    tokenizer = load_tokenizer(config)
    model = load_model(config, tokenizer)
    assert type(decoder_of(model)).__name__ == "LlamaModel"
    lora = apply_peft(model, {"use_peft": True, "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0})
    assert decoder_of(lora) is model.model
