"""``train_online`` (marked e2e) from the shared SFT start: GRPO's window normaliser and per-prompt
sampling make 1×4, 2×2 and two ranks × 2 prompts per step train the same weights; a run killed
in the middle of a generation batch (``num_iterations=2``) resumes bit-identical; RLOO with its
KL reward runs and logs what the issue lists; bad reward names are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import (
    final_weights,
    read_metrics,
    run_dirs,
    run_entrypoint,
    run_killed_at,
    run_two_ranks,
)
from .test_config_errors import written_by_us

pytestmark = pytest.mark.e2e

COMMON = ("wandb.mode=disabled", "tensorboard=false", "training_args.max_steps=3",
          "training_args.logging_steps=1", "training_args.eval_steps=null",
          "training_args.save_steps=null", "evaluation.at_end=false",
          "evaluation.max_examples=24", "generation.max_new_tokens=8",
          "trainer.num_generations=4", "training_args.learning_rate=1e-4")  # fmt: skip


@pytest.fixture(scope="module")
def start(tiny_sft_start: Path) -> list[str]:
    return [f"model.model_name_or_path={tiny_sft_start}", "model.init_from_config=false"]


def test_grpo_accumulation_and_ranks_train_the_same_weights(start, tmp_path: Path) -> None:
    for b, k in ((4, 1), (2, 2)):
        run_entrypoint(
            "train_online",
            [*COMMON, *start, f"job_subdir=acc{k}",
             f"training_args.per_device_train_batch_size={b}",
             f"training_args.gradient_accumulation_steps={k}"],
            tmp_path,
        )  # fmt: skip
    run_two_ranks(
        "train_online",
        [*COMMON, *start, "job_subdir=ranks", "training_args.per_device_train_batch_size=2",
         "training_args.gradient_accumulation_steps=1"],
        tmp_path,
        port=29541,
    )  # fmt: skip

    (run,) = run_dirs(tmp_path, "acc1", "train_online")
    train = [m for m in read_metrics(run) if "loss" in m]
    assert len(train) == 3
    for key in ("reward", "reward_std", "rewards/tiny_task_partial/mean", "advantages/std",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length",
                "completions/min_length", "completions/max_length",
                "completions/truncated_ratio", "entropy", "time/generation_share",
                "time/scoring_share", "time/training_share"):  # fmt: skip
        assert key in train[-1], key
    assert 0 < train[0]["time/generation_share"] < 1
    evals = [m for m in read_metrics(run) if "eval_exact_match" in m]
    assert len(evals) == 1 and 0 <= evals[0]["eval_exact_match"] <= 1
    ref = final_weights(tmp_path, "acc1", "train_online")
    for job in ("acc2", "ranks"):
        other = final_weights(tmp_path, job, "train_online")
        for name in ref:
            torch.testing.assert_close(other[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    (ranks,) = run_dirs(tmp_path, "ranks", "train_online")
    first = next(m for m in read_metrics(ranks) if "reward" in m)
    assert first["reward"] == pytest.approx(train[0]["reward"], rel=1e-6)


def test_grpo_resumes_bit_identical_inside_a_generation_batch(start, tmp_path: Path) -> None:
    args = [*COMMON, *start, "training_args.max_steps=4", "training_args.save_steps=3",
            "trainer.num_iterations=2", "trainer.loss_type=dapo", "trainer.beta=0.05",
            "trainer.epsilon_high=0.28",
            "trainer.rewards=[{function: exact_match, weight: 1.0}, "
            "{function: tiny_task_partial, weight: 0.5}]",
            "training_args.per_device_train_batch_size=2",
            "training_args.gradient_accumulation_steps=1"]  # fmt: skip
    run_entrypoint("train_online", [*args, "job_subdir=straight"], tmp_path)
    resumable = [*args, "job_subdir=killed", "resuming.resume=true"]
    # killed while saving step 4: the resume takes checkpoint-3, inside the generation batch
    # of steps 3-4, which it must not sample again
    run_killed_at("train_online", resumable, tmp_path, "checkpoint-saved-state@4")
    resumed = run_entrypoint("train_online", resumable, tmp_path)
    assert "Resumed at step 3 " in resumed.stdout + resumed.stderr
    a = final_weights(tmp_path, "straight", "train_online")
    b = final_weights(tmp_path, "killed", "train_online")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    (run,) = run_dirs(tmp_path, "straight", "train_online")
    train = [m for m in read_metrics(run) if "loss" in m]
    assert all("kl" in m for m in train) and train[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert train[1]["kl"] > 0  # the second pass over a generation batch: the policy moved


def test_rloo_runs_with_its_kl_reward_and_lora(start, tmp_path: Path) -> None:
    run_entrypoint(
        "train_online",
        [*COMMON, *start, "trainer=rloo", "trainer.num_generations=4", "trainer.beta=0.1",
         "model_args.use_peft=true", "job_subdir=rloo",
         "training_args.per_device_train_batch_size=2",
         "training_args.gradient_accumulation_steps=1"],
        tmp_path,
    )  # fmt: skip
    (run,) = run_dirs(tmp_path, "rloo", "train_online")
    train = [m for m in read_metrics(run) if "loss" in m]
    assert len(train) == 3 and all("kl" in m for m in train)
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.rewards=[{function: no_such_reward}]", "no_such_reward"),
        ("trainer.num_generations=1", "num_generations must be at least 2"),
    ],
)
def test_bad_online_configs_are_one_line(override: str, message: str, tmp_path: Path) -> None:
    proc = run_entrypoint("train_online", [*COMMON, override], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert written_by_us(tmp_path) == []  # nothing but Hydra's record of the call
