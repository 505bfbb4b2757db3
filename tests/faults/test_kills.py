"""Fault injection: kill -9 at each phase of a save, several times in one run, then resume: the
final weights are bit-identical to an uninterrupted run's and no temporary is left. Real
trainings of the tiny model (marked e2e); the kills are exact (``POST_TRAINING_FAILPOINT``,
:mod:`post_training.utils.failpoints`), not raced against a polling test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import QUICK, job_dir, run_entrypoint

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

COMMON = (*QUICK, "training_args.max_steps=12", "training_args.save_steps=4")


def final_weights(artifacts: Path, job: str) -> dict[str, torch.Tensor]:
    (model,) = job_dir(artifacts, job).rglob("final-model/model.safetensors")
    return load_file(model)


def test_killed_in_every_save_phase_then_resumed_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    run_entrypoint("train_sft", [*COMMON, "job_subdir=straight"], tmp_path)
    resumable = [*COMMON, "job_subdir=killed", "resuming.resume=true"]
    checkpoints = job_dir(tmp_path, "killed") / "checkpoints"

    def killed_at(point: str) -> str:
        proc = run_entrypoint(
            "train_sft", resumable, tmp_path, check=False, env={"POST_TRAINING_FAILPOINT": point}
        )
        assert proc.returncode == -9, f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    # 1. The step-4 save has its weights and optimizer state, not its trainer state/manifest.
    killed_at("checkpoint-saved-state@4")
    assert [p.name for p in checkpoints.glob("*/.tmp-checkpoint-4")] == [".tmp-checkpoint-4"]
    assert not list(checkpoints.glob("*/checkpoint-*"))
    # 2. Starts afresh (nothing complete), then the step-8 save is complete but not renamed.
    output = killed_at("checkpoint-before-publish@8")
    assert "Resumed at step" not in output
    assert sorted(p.name for p in checkpoints.glob("*/checkpoint-*")) == ["checkpoint-4"]
    assert list(checkpoints.glob("*/.tmp-checkpoint-8"))
    # 3. Resumes at 4, trains to the end, killed while writing the final model.
    output = killed_at("final-model-written")
    assert "Resumed at step 4 " in output
    assert not list(checkpoints.glob("*/final-model"))
    # 4. Resumes the finished schedule at 12 and writes the final model.
    proc = run_entrypoint("train_sft", resumable, tmp_path)
    assert "Resumed at step 12 " in proc.stdout + proc.stderr
    assert not list(checkpoints.rglob(".tmp-*")), "a temporary was left behind"
    assert not list(checkpoints.rglob(".old-*"))

    a, b = final_weights(tmp_path, "straight"), final_weights(tmp_path, "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
