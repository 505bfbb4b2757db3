"""KTO through ``train_preference`` (marked e2e): paired data unpaired on the command line, the
KL reference point taken over the whole window so that 1×16, 4×4 and two ranks × 8 give the
same weights, bit-identical resume, and a paired file without ``dataset.unpair`` named."""

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

pytestmark = pytest.mark.e2e

COMMON = ("wandb.mode=disabled", "tensorboard=false", "trainer=kto", "dataset.unpair=true",
          "training_args.num_train_epochs=null", "training_args.max_steps=2",
          "training_args.max_grad_norm=null", "dataset.max_train_examples=64",
          "dataset.max_eval_examples=16", "evaluation.at_end=false",
          "training_args.logging_steps=1", "training_args.eval_steps=null")  # fmt: skip


@pytest.fixture(scope="module")
def start(tiny_sft_start: Path) -> list[str]:
    """The untrained init as policy and the SFT start as reference: the SFT model gives the
    mismatched KL completions (an answer to another task) far less probability than the
    near-uniform init does, so ``z₀`` is large and differs between micro-batches (a
    per-micro-batch estimate would change the result). The other way round it is negative and
    clamped to 0."""
    return [f"reference.model_name_or_path={tiny_sft_start}"]


def test_kto_window_kl_accumulation_and_ranks_are_exact(start: list[str], tmp_path: Path) -> None:
    for b, k in ((16, 1), (4, 4)):
        run_entrypoint(
            "train_preference",
            [*COMMON, *start, f"job_subdir=acc{k}",
             f"training_args.per_device_train_batch_size={b}",
             f"training_args.gradient_accumulation_steps={k}"],
            tmp_path,
        )  # fmt: skip
    run_two_ranks(
        "train_preference",
        [*COMMON, *start, "job_subdir=ranks",
         "training_args.per_device_train_batch_size=8",
         "training_args.gradient_accumulation_steps=1",
         f"data.cache_dir={tmp_path / 'cache-ranks'}"],
        tmp_path,
        port=29531,
    )  # fmt: skip

    (run,) = run_dirs(tmp_path, "acc1", "train_preference")
    log = (run / "train_preference.log").read_text()
    assert "KTO examples: 64 desirable, 64 undesirable" in log
    train = [m for m in read_metrics(run) if "loss" in m and "eval_loss" not in m]
    assert train and all(m["kl"] > 1.0 for m in train), "z₀ is large here (see the fixture)"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert key in train[-1], key
    ref = final_weights(tmp_path, "acc1", "train_preference")
    for job in ("acc4", "ranks"):
        other = final_weights(tmp_path, job, "train_preference")
        for name in ref:
            torch.testing.assert_close(other[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    (ranks,) = run_dirs(tmp_path, "ranks", "train_preference")
    first = next(m for m in read_metrics(ranks) if "kl" in m and "eval_loss" not in m)
    assert first["kl"] == pytest.approx(train[0]["kl"], rel=1e-4)


def test_kto_resumes_bit_identical(start: list[str], tmp_path: Path) -> None:
    args = [*COMMON, *start, "training_args.max_steps=6", "training_args.save_steps=2"]
    run_entrypoint("train_preference", [*args, "job_subdir=straight"], tmp_path)
    resumable = [*args, "job_subdir=killed", "resuming.resume=true"]
    # killed while saving step 4: the resume takes checkpoint-2
    run_killed_at("train_preference", resumable, tmp_path, "checkpoint-saved-state@4")
    resumed = run_entrypoint("train_preference", resumable, tmp_path)
    assert "Resumed at step 2 " in resumed.stdout + resumed.stderr
    a = final_weights(tmp_path, "straight", "train_preference")
    b = final_weights(tmp_path, "killed", "train_preference")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_paired_data_without_unpair_is_named(tmp_path: Path) -> None:
    args = [arg for arg in COMMON if arg != "dataset.unpair=true"]
    proc = run_entrypoint("train_preference", args, tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "KTO needs unpaired rows" in line]
    assert lines and "train.jsonl:1" in lines[0] and "dataset.unpair=true" in lines[0], proc.stderr[
        -2000:
    ]
