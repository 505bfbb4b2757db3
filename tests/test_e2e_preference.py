"""End to end (marked e2e): reference log-probs three ways on the tiny model, and pairs packed
several per row training as one per row. That DPO and QRPO
raise held-out accuracy over an SFT start is tested on the pairs the alignment data pipeline
builds (``test_e2e_alignment.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import job_dir, read_metrics, run_dirs, run_entrypoint

pytestmark = pytest.mark.e2e

COMMON = ["wandb.mode=disabled", "tensorboard=false", "training_args.logging_steps=5"]


def _final_state(artifacts: Path, job: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (model,) = job_dir(artifacts, job, "train_preference").rglob("final-model/model.safetensors")
    return load_file(model)


def test_reference_log_probs_three_ways(artifacts: Path) -> None:
    """A live frozen reference and precomputed (cached) reference log-probs train identically;
    LoRA uses the adapter-less policy as reference; simpo loads no reference."""
    quick = [
        *COMMON,
        "training_args.num_train_epochs=null",
        "training_args.max_steps=3",
        "dataset.max_train_examples=96",
        "dataset.max_eval_examples=16",
        "evaluation.at_end=false",
        "training_args.logging_steps=1",
    ]
    run_entrypoint("train_preference", [*quick, "job_subdir=live"], artifacts)
    for job in ("pre", "pre-again"):  # the second run reads the cache
        run_entrypoint(
            "train_preference",
            [*quick, f"job_subdir={job}", "reference.precompute=true"],
            artifacts,
        )
    logs = {
        job: (run_dirs(artifacts, job, "train_preference")[0] / "train_preference.log").read_text()
        for job in ("live", "pre", "pre-again")
    }
    assert "Reference log-probs: model" in logs["live"]
    assert "Reference log-probs of 112 pairs written to" in logs["pre"]
    assert "Reference log-probs from the cache" in logs["pre-again"]
    live, pre = _final_state(artifacts, "live"), _final_state(artifacts, "pre")
    for name in live:
        torch.testing.assert_close(pre[name], live[name], rtol=1e-5, atol=1e-6, msg=name)

    # Several pairs per row (training_args.packing): the same steps, in fewer, fuller rows.
    packed = [*quick, "job_subdir=packed", "training_args.packing=true"]
    run_entrypoint("train_preference", packed, artifacts)
    packed_state = _final_state(artifacts, "packed")
    for name in live:
        torch.testing.assert_close(packed_state[name], live[name], rtol=1e-5, atol=1e-6, msg=name)
    metrics = {
        job: read_metrics(run_dirs(artifacts, job, "train_preference")[0])
        for job in ("live", "packed")
    }
    for unpacked_step, packed_step in zip(metrics["live"], metrics["packed"], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            if key in unpacked_step:
                assert packed_step[key] == pytest.approx(unpacked_step[key], rel=1e-4, abs=1e-6)

    run_entrypoint(
        "train_preference", [*quick, "job_subdir=lora", "model_args.use_peft=true"], artifacts
    )
    (run_dir,) = run_dirs(artifacts, "lora", "train_preference")
    assert "Reference log-probs: peft" in (run_dir / "train_preference.log").read_text()
    first = read_metrics(run_dir)[0]
    # LoRA starts as the identity (B = 0): the policy equals its adapter-less reference.
    assert abs(first["rewards/margins"]) < 1e-6 and abs(first["loss"] - 0.693147) < 1e-5

    simpo = [*quick, "job_subdir=simpo", "trainer.loss_type=simpo", "trainer.beta=2.0"]
    run_entrypoint("train_preference", simpo, artifacts)
    (run_dir,) = run_dirs(artifacts, "simpo", "train_preference")
    log = (run_dir / "train_preference.log").read_text()
    assert "Reference log-probs: none" in log and log.count("0.80M parameters") == 1
