"""The architecture issue's bad launches: each fails before anything is written, in one line
naming the key, the value and the rule, without a traceback; resuming is not poisoned by them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import QUICK, job_dir, run_entrypoint


def written_by_us(artifacts: Path) -> list[Path]:
    """Files a launch wrote besides Hydra's own record of the call (.hydra/, the job log) and
    the status.json that marks the failed launch in it."""
    return [
        p
        for p in artifacts.rglob("*")
        if p.is_file()
        and ".hydra" not in p.parts
        and p.suffix != ".log"
        and p.name != "status.json"
    ]


@pytest.mark.parametrize(
    "overrides,line",
    [
        (
            ["training_args.learning_rate=abc"],
            "training_args.learning_rate='abc': must be a valid number",
        ),
        (
            ["training_args.per_device_train_batch_size=0"],
            "training_args.per_device_train_batch_size=0: must be greater than 0",
        ),
        (
            ["training_args.per_device_train_batch_size=-4"],
            "training_args.per_device_train_batch_size=-4: must be greater than 0",
        ),
        (
            ["training_args.num_train_epochs=null", "training_args.max_steps=0"],
            "training_args.max_steps=0: must be greater than 0",
        ),
        (
            ["trainer=plw", "trainer.plw_args.prompt_loss_weight=-0.1"],
            "trainer.plw_args.prompt_loss_weight=-0.1: must be greater than or equal to 0",
        ),
    ],
)
def test_bad_value_fails_before_anything_is_written(overrides, line, artifacts: Path) -> None:
    proc = run_entrypoint(
        "train_sft", [*overrides, "wandb.mode=disabled", "resuming.resume=true"], artifacts, False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: invalid config: {line}"), errors
    assert written_by_us(artifacts) == []  # no frozen config, no checkpoints/<hash>/config.yaml


def test_traceback_on_request(artifacts: Path) -> None:
    bad = ["training_args.learning_rate=abc", "wandb.mode=disabled"]
    proc = run_entrypoint("train_sft", [*bad, "debug.traceback=true"], artifacts, False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        proc = run_entrypoint("train_sft", bad, artifacts, False)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
    assert "Traceback" in proc.stderr


def test_a_failed_launch_does_not_poison_the_resume_target(artifacts: Path) -> None:
    """A launch that fails (validation, or later on its data) leaves no checkpoint: the
    corrected re-run of the same job starts, it is not refused as config drift."""
    base = [*QUICK, "training_args.max_steps=2", "job_subdir=retry", "resuming.resume=true"]
    bad_data = ["dataset.train.path=/nowhere/train.jsonl"]
    failed = run_entrypoint("train_sft", [*base, *bad_data], artifacts, check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "/nowhere/train.jsonl" in failed.stderr
    run_entrypoint("train_sft", base, artifacts)
    assert list(job_dir(artifacts, "retry").glob("checkpoints/*/checkpoint-2"))


def test_checkpoints_without_their_config_are_not_silently_resumed(artifacts: Path) -> None:
    base = [*QUICK, "training_args.max_steps=2", "job_subdir=lost", "resuming.resume=true"]
    run_entrypoint("train_sft", base, artifacts)
    (config,) = job_dir(artifacts, "lost").glob("checkpoints/*/config.yaml")
    config.unlink()
    proc = run_entrypoint(
        "train_sft", [*base, "training_args.learning_rate=1e-3"], artifacts, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds checkpoints but no config.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
