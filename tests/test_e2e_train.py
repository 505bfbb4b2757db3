"""End to end: real training runs of the tiny model in subprocesses (marked e2e)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from post_training.utils.signals import EXIT_CODE_STOPPED

from .conftest import (
    QUICK,
    final_weights,
    job_dir,
    read_metrics,
    run_dirs,
    run_entrypoint,
    run_two_ranks,
    save_initial_model,
    start_entrypoint,
)

pytestmark = pytest.mark.e2e


def wait_for(predicate, proc, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.parametrize("strategy", ["epoch", "no"])
def test_eval_strategy_schedules_evaluation(artifacts: Path, strategy: str) -> None:
    """32 examples in batches of 8: 4 steps per epoch, 2 epochs."""
    args = [*QUICK, "training_args.num_train_epochs=2", "dataset.max_train_examples=32",
            "training_args.eval_steps=1", f"training_args.eval_strategy={strategy}",
            f"job_subdir={strategy}"]  # fmt: skip
    run_entrypoint("train_sft", args, artifacts)
    (run_dir,) = run_dirs(artifacts, strategy)
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == ([4, 8] if strategy == "epoch" else [])
    for m in evals:
        assert 0.0 <= m["eval_sequence_exact_match"] <= 1.0
        assert {"eval_completion_loss", "eval_completion_token_accuracy"} <= m.keys()


def test_kill_9_then_resume_gives_identical_final_weights(artifacts: Path) -> None:
    common = [*QUICK, "training_args.max_steps=24", "training_args.save_steps=4"]
    run_entrypoint("train_sft", [*common, "job_subdir=straight"], artifacts)

    resumable = [*common, "job_subdir=killed", "resuming.resume=true"]
    ckpts = job_dir(artifacts, "killed") / "checkpoints"
    proc = start_entrypoint("train_sft", resumable, artifacts)
    wait_for(lambda: bool(list(ckpts.glob("*/checkpoint-8"))), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(ckpts.glob("*/final-model")), "killed too late to test resuming"

    second = run_entrypoint("train_sft", resumable, artifacts)
    output = second.stdout + second.stderr
    assert "Resumed at step" in output
    resumed_at = int(output.split("Resumed at step ")[1].split()[0])
    assert 8 <= resumed_at < 24
    assert not list(ckpts.rglob(".tmp-*")), "no half-written checkpoint left behind"

    a, b = final_weights(artifacts, "straight"), final_weights(artifacts, "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigusr1_checkpoints_exits_75_and_resume_continues(artifacts: Path) -> None:
    args = [
        *QUICK,
        "training_args.max_steps=400",
        "training_args.save_steps=1000",
        "job_subdir=signal",
        "resuming.resume=true",
    ]
    proc = start_entrypoint("train_sft", args, artifacts)
    runs = job_dir(artifacts, "signal") / "runs"
    wait_for(lambda: any(p.stat().st_size for p in runs.glob("*/metrics.jsonl")), proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_CODE_STOPPED
    (ckpt,) = job_dir(artifacts, "signal").glob("checkpoints/*/checkpoint-*")
    stopped_at = int(ckpt.name.split("-")[1])
    assert 0 < stopped_at < 400
    first_run = run_dirs(artifacts, "signal")[0]
    assert read_metrics(first_run)[-1]["step"] == stopped_at

    run_entrypoint("train_sft", args, artifacts)
    second_run = run_dirs(artifacts, "signal")[1]
    steps = [m["step"] for m in read_metrics(second_run) if "loss" in m]
    assert steps[0] == stopped_at + 1 and steps[-1] == 400
    state = json.loads(
        next(job_dir(artifacts, "signal").rglob("checkpoint-400/trainer_state.json")).read_text()
    )
    assert state["global_step"] == 400 and state["samples_seen"] == 400 * 8


def test_config_drift_refused_on_rerun(artifacts: Path) -> None:
    args = [*QUICK, "training_args.max_steps=2", "job_subdir=drift", "resuming.resume=true"]
    run_entrypoint("train_sft", args, artifacts)
    # The same command again: the finished job resumes at its end and rewrites no checkpoint.
    (done,) = job_dir(artifacts, "drift").glob("checkpoints/*/checkpoint-2")
    before = (done / "model.safetensors").stat().st_mtime_ns
    again = run_entrypoint("train_sft", args, artifacts)
    assert "Resumed at step 2" in again.stdout + again.stderr
    assert (done / "model.safetensors").stat().st_mtime_ns == before
    proc = run_entrypoint(
        "train_sft", [*args, "training_args.learning_rate=0.1"], artifacts, check=False
    )
    assert proc.returncode != 0
    assert "training_args.learning_rate: 0.002 -> 0.1" in proc.stderr
    assert len(list(job_dir(artifacts, "drift").glob("checkpoints/*/"))) == 1


def test_gradient_accumulation_equals_one_big_batch(artifacts: Path) -> None:
    """16 examples per step as 1×16, 2×8 (uneven lengths per micro-batch) and 4×4."""
    base = [*QUICK, "training_args.max_steps=3", "training_args.max_grad_norm=null"]
    for b, k in ((16, 1), (8, 2), (4, 4)):
        run_entrypoint(
            "train_sft",
            [
                *base,
                f"job_subdir=acc{k}",
                f"training_args.per_device_train_batch_size={b}",
                f"training_args.gradient_accumulation_steps={k}",
            ],
            artifacts,
        )
    ref = final_weights(artifacts, "acc1")
    for k in (2, 4):
        other = final_weights(artifacts, f"acc{k}")
        for name in ref:
            torch.testing.assert_close(other[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_debug_run_goes_to_separate_dir_with_inference_checkpoints(artifacts: Path) -> None:
    run_entrypoint(
        "train_sft",
        [
            *QUICK,
            "training_args.max_steps=100",
            "debug.enabled=true",
            "training_args.inference_checkpoint_steps=2",
        ],
        artifacts,
    )
    debug_runs = list((artifacts / "private/outputs-debug/train_sft/dev/runs").iterdir())
    assert len(debug_runs) == 1
    assert not (artifacts / "private/outputs").exists()
    assert read_metrics(debug_runs[0])[-1]["step"] == 5
    ckpts = debug_runs[0] / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("inference-checkpoint-*")) == [
        "inference-checkpoint-2",
        "inference-checkpoint-4",
    ]
    model = AutoModelForCausalLM.from_pretrained(ckpts / "inference-checkpoint-4")
    tokenizer = AutoTokenizer.from_pretrained(ckpts / "inference-checkpoint-4")
    assert tokenizer.chat_template and model.config.eos_token_id == tokenizer.eos_token_id
    assert not list((ckpts / "inference-checkpoint-4").glob("optimizer*")), "lightweight only"


def test_two_processes_equal_one_process_with_twice_the_batch(artifacts: Path) -> None:
    """`accelerate launch --num_processes 2` on CPU (gloo) = one process with twice the batch."""
    base = [*QUICK, "training_args.max_steps=3", "training_args.max_grad_norm=null"]
    run_entrypoint(
        "train_sft",
        [*base, "job_subdir=one", "training_args.per_device_train_batch_size=16"],
        artifacts,
    )
    run_two_ranks(
        "train_sft",
        [*base, "job_subdir=two", "training_args.per_device_train_batch_size=8",
         f"data.cache_dir={artifacts / 'cache-two'}"],
        artifacts,
        port=29517,
    )  # fmt: skip
    (run_dir,) = run_dirs(artifacts, "two")
    assert (run_dir / "rank-1").is_dir(), "rank 1's Hydra dir is folded into the shared run dir"
    # Only the main process tokenized; rank 1 waited and read the cache it wrote.
    assert "train split: kept" in (run_dir / "train_sft.log").read_text()
    rank1_log = next((run_dir / "rank-1").rglob("*.log")).read_text()
    assert "Tokenized data from the cache" in rank1_log and "train split: kept" not in rank1_log
    assert read_metrics(run_dir)[0]["num_samples"] == 16
    ref, two = final_weights(artifacts, "one"), final_weights(artifacts, "two")
    for name in ref:
        torch.testing.assert_close(two[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lora_trains_adapters_and_saves_adapter_and_merged_model(artifacts: Path) -> None:
    args = [*QUICK, "training_args.max_steps=6", "model_args.use_peft=true", "job_subdir=lora",
            "model_args.lora_r=4", "training_args.learning_rate=0.01"]  # fmt: skip
    run_entrypoint("train_sft", args, artifacts)
    (adapter,) = job_dir(artifacts, "lora").rglob("final-adapter")
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(
        next(job_dir(artifacts, "lora").rglob("final-model"))
    )
    # Base weights outside the LoRA targets are frozen; targeted linears moved by B·A.
    init = AutoModelForCausalLM.from_pretrained(save_initial_model(artifacts / "init-model"))
    init_params = dict(init.named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, init_params[n])}
    assert changed and all("proj" in n for n in changed), changed
    assert not any("embed" in n or "norm" in n for n in changed)
