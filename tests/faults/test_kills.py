"""Fault injection: kill -9 at each phase of a save, several times in one run, then resume: the
final weights are bit-identical to an uninterrupted run's and no temporary is left. Real
trainings of the tiny model (marked e2e); the kills are exact (``POST_TRAINING_FAILPOINT``,
:mod:`post_training.utils.failpoints`), not raced against a polling test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..conftest import QUICK, final_weights, job_dir, run_entrypoint, run_killed_at

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

COMMON = (*QUICK, "training_args.max_steps=12", "training_args.save_steps=4")


def test_killed_in_every_save_phase_then_resumed_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    run_entrypoint("train_sft", [*COMMON, "job_subdir=straight"], tmp_path)
    resumable = [*COMMON, "job_subdir=killed", "resuming.resume=true"]
    checkpoints = job_dir(tmp_path, "killed") / "checkpoints"

    def killed_at(point: str) -> str:
        proc = run_killed_at("train_sft", resumable, tmp_path, point)
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


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_75(tmp_path: Path) -> None:
    """Preemption (SLURM sends SIGTERM): as SIGUSR1 (whose resume ``test_e2e_train`` checks)."""
    import signal
    import time

    from post_training.utils.checkpointing import verify_checkpoint
    from post_training.utils.signals import EXIT_CODE_STOPPED

    from ..conftest import start_entrypoint

    args = [*QUICK, "training_args.max_steps=2000", "training_args.save_steps=5000",
            "job_subdir=term", "resuming.resume=true"]  # fmt: skip
    proc = start_entrypoint("train_sft", args, tmp_path)
    metrics = job_dir(tmp_path, "term") / "runs"
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size for p in metrics.glob("*/metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODE_STOPPED, err[-3000:]
    assert "Received SIGTERM" in out + err
    (checkpoint,) = job_dir(tmp_path, "term").glob("checkpoints/*/checkpoint-*")
    assert 0 < int(checkpoint.name.split("-")[1]) < 2000
    assert verify_checkpoint(checkpoint) is None
    assert not list(job_dir(tmp_path, "term").glob("checkpoints/*/final-model"))
    (run_dir,) = metrics.iterdir()  # its status.json: stopped by the signal, at that step
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("stopped", EXIT_CODE_STOPPED)
    assert status["last_step"] == int(checkpoint.name.split("-")[1])
