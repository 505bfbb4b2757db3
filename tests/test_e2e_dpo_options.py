"""TRL's DPO options through ``train_preference`` (marked e2e): a loss list with weights,
LD-DPO and WPO run from the command line; TR-DPO's synchronised reference is mixed every
``ref_model_sync_steps`` and travels in the checkpoints, so a run killed after a sync resumes
bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import final_weights, job_dir, read_metrics, run_dirs, run_entrypoint, run_killed_at

pytestmark = pytest.mark.e2e

COMMON = ("wandb.mode=disabled", "tensorboard=false", "training_args.num_train_epochs=null",
          "training_args.max_steps=8", "training_args.save_steps=2",
          "dataset.max_train_examples=96", "dataset.max_eval_examples=16",
          "evaluation.at_end=false", "training_args.logging_steps=1")  # fmt: skip


def test_loss_list_ld_alpha_and_wpo_from_the_command_line(artifacts: Path) -> None:
    args = [
        *COMMON,
        "training_args.max_steps=2",
        "job_subdir=options",
        "trainer.loss_type=[sigmoid,bco_pair,sft]",
        "trainer.loss_weights=[0.8,0.2,1.0]",
        "trainer.ld_alpha=0.5",
        "trainer.use_weighting=true",
    ]
    run_entrypoint("train_preference", args, artifacts)
    (run,) = run_dirs(artifacts, "options", "train_preference")
    train = [m for m in read_metrics(run) if "wpo_weight" in m]
    assert train, "WPO's weights are logged"
    assert all(0 < m["wpo_weight"] <= 1 for m in train)


def _reference_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    (state,) = checkpoint.glob("custom_checkpoint_1.pkl")  # 0: the scheduler, 1: the reference
    return torch.load(state, weights_only=True)


def test_tr_dpo_syncs_the_reference_and_resumes_identical(tmp_path: Path) -> None:
    sync = ("trainer.sync_ref_model=true", "trainer.ref_model_sync_steps=3",
            "trainer.ref_model_mixup_alpha=0.5", "training_args.save_total_limit=null")  # fmt: skip
    run_entrypoint("train_preference", [*COMMON, *sync, "job_subdir=straight"], tmp_path)
    straight = job_dir(tmp_path, "straight", "train_preference")
    (step2,) = straight.rglob("checkpoint-2")
    (step4,) = straight.rglob("checkpoint-4")
    before, after = _reference_state(step2), _reference_state(step4)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "synced at step 3"

    resumable = [*COMMON, *sync, "job_subdir=killed", "resuming.resume=true"]
    run_killed_at("train_preference", resumable, tmp_path, "checkpoint-saved-state@6")
    resumed = run_entrypoint("train_preference", resumable, tmp_path)
    assert "Resumed at step 4 " in resumed.stdout + resumed.stderr
    a = final_weights(tmp_path, "straight", "train_preference")
    b = final_weights(tmp_path, "killed", "train_preference")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_tr_dpo_refuses_a_precomputed_reference(artifacts: Path) -> None:
    proc = run_entrypoint(
        "train_preference",
        [*COMMON, "trainer.sync_ref_model=true", "reference.precompute=true"],
        artifacts,
        check=False,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "sync_ref_model" in line]
    assert lines and "reference.precompute=true fixes the reference" in lines[0], proc.stderr[
        -2000:
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("loss_type", ["sigmoid", "alphapo"])
def test_cpo_trains_reference_free_from_the_command_line(artifacts: Path, loss_type: str) -> None:
    extra = ["trainer.alpha=0.25"] if loss_type == "alphapo" else []
    job = f"cpo-{loss_type}"
    args = [*COMMON, "training_args.max_steps=2", f"job_subdir={job}", "trainer=cpo",
            f"trainer.loss_type={loss_type}", *extra]  # fmt: skip
    run_entrypoint("train_preference", args, artifacts)
    (run,) = run_dirs(artifacts, job, "train_preference")
    assert "Reference log-probs: none" in (run / "train_preference.log").read_text()
    train = [m for m in read_metrics(run) if "rewards/margins" in m and "eval_loss" not in m]
    assert len(train) == 2 and all("nll_loss" in m for m in train)
