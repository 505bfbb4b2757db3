"""End to end: each SFT-family trainer, and packed training, learns the embedded task (marked
e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import job_dir, read_metrics, run_dirs, run_entrypoint

pytestmark = pytest.mark.e2e


def test_packed_training_learns_and_counts_tokens(artifacts: Path) -> None:
    """Padding-free packing end to end: fewer, fuller rows; same task learned; the token budget
    (num_training_tokens) sets the number of steps."""
    args = [
        "wandb.mode=disabled", "tensorboard=false", "job_subdir=packed",
        "training_args.packing=true", "training_args.num_train_epochs=null",
        "training_args.num_training_tokens=700000", "training_args.per_device_train_batch_size=2",
        "trainer=plw", "trainer.plw_args.sequence_level_loss=true",
    ]  # fmt: skip
    run_entrypoint("train_sft", args, artifacts)
    (run_dir,) = run_dirs(artifacts, "packed")
    log = (run_dir / "train_sft.log").read_text()
    assert "Packed 8000 train examples into" in log
    events = [m for m in read_metrics(run_dir) if "loss" in m]
    tokens = events[-1]["num_tokens"]
    assert 650_000 <= tokens <= 750_000, tokens
    (final,) = job_dir(artifacts, "packed").rglob("final-model")
    result = json.loads((final / "eval-tiny-tasks.json").read_text())
    print("packed", result["accuracy"], result["per_task"], "steps", events[-1]["step"])
    assert result["accuracy"] >= 0.3


@pytest.mark.parametrize("trainer", ["plw", "ln-plw", "irl"])
def test_each_sft_family_trainer_learns_the_default_task(artifacts: Path, trainer: str) -> None:
    """Default settings with another trainer, for 2 of the default 10 epochs (the whole schedule,
    warm-up and decay included, over 500 steps): well above the untrained model's 0% exact match
    (SFT itself gets 0.275 this way; the default run, 10 epochs, is the main-job test's)."""
    args = [f"trainer={trainer}", "training_args.num_train_epochs=2", "wandb.mode=disabled",
            "tensorboard=false", f"job_subdir={trainer}"]  # fmt: skip
    run_entrypoint("train_sft", args, artifacts)
    (final,) = job_dir(artifacts, trainer).rglob("final-model")
    result = json.loads((final / "eval-tiny-tasks.json").read_text())
    print(trainer, result["accuracy"], result["per_task"])
    assert result["accuracy"] >= 0.2
    (run_dir,) = run_dirs(artifacts, trainer)
    last = [m for m in read_metrics(run_dir) if "loss" in m][-1]
    assert last["step"] == 500
    for key in ("prompt_loss", "completion_loss", "completion_token_accuracy", "token_accuracy"):
        assert key in last
    if trainer == "irl":
        assert "td_loss" in last and "implicit_reward" in last
