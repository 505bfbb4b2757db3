"""Fault injection for preference training (DPO): killed during a save with a damaged newest
checkpoint left behind, the resumed run falls back to the previous one and ends bit-identical to
an uninterrupted run (marked e2e)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ..conftest import final_weights, job_dir, run_entrypoint, run_killed_at

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

COMMON = ("wandb.mode=disabled", "tensorboard=false", "training_args.num_train_epochs=null",
          "training_args.max_steps=8", "training_args.save_steps=2",
          "dataset.max_train_examples=96", "dataset.max_eval_examples=16",
          "evaluation.at_end=false", "training_args.logging_steps=1")  # fmt: skip


def test_dpo_killed_with_a_damaged_newest_checkpoint_resumes_identical(tmp_path: Path) -> None:
    run_entrypoint("train_preference", [*COMMON, "job_subdir=straight"], tmp_path)
    resumable = [*COMMON, "job_subdir=killed", "resuming.resume=true"]
    run_killed_at("train_preference", resumable, tmp_path, "checkpoint-saved-state@6")
    checkpoints = job_dir(tmp_path, "killed", "train_preference") / "checkpoints"
    (newest,) = checkpoints.glob("*/checkpoint-4")
    weights = newest / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)

    resumed = run_entrypoint("train_preference", resumable, tmp_path)
    output = resumed.stdout + resumed.stderr
    assert "model.safetensors has" in output and "Resumed at step 2 " in output
    assert (newest.parent / "checkpoint-4.damaged").is_dir()
    a = final_weights(tmp_path, "straight", "train_preference")
    b = final_weights(tmp_path, "killed", "train_preference")
    for name in a:
        assert torch.equal(a[name], b[name]), name
