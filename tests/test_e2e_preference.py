"""End to end: SFT the tiny model briefly, then DPO and QRPO on pairs of the embedded task
(correct vs wrong answer) raise held-out exact-match accuracy above the SFT start (marked e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from post_training.utils.config import asset_path

from .conftest import job_dir, read_metrics, run_dirs, run_entrypoint

pytestmark = pytest.mark.e2e

COMMON = ["wandb.mode=disabled", "tensorboard=false", "training_args.logging_steps=5"]
NUM_PAIRS = 2000


@torch.no_grad()
def reference_rewards(model_dir: Path, rows: list[dict], k: int = 4) -> list[list[float]]:
    """Exact-match rewards of k sampled completions of the reference (SFT) model per prompt."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    rewards = []
    for start in range(0, len(rows), 250):
        chunk = rows[start : start + 250]
        texts = [
            tokenizer.apply_chat_template(
                r["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            for r in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=12,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, row in enumerate(chunk):
            answers = new[i * k : (i + 1) * k]
            rewards.append([float(a.strip() == row["answer"]) for a in answers])
    return rewards


def accuracy(artifacts: Path, job: str, entrypoint: str) -> float:
    (final,) = job_dir(artifacts, job, entrypoint).rglob("final-model")
    return json.loads((final / "eval-tiny-tasks.json").read_text())["accuracy"]


def test_dpo_and_qrpo_improve_on_the_sft_start(artifacts: Path) -> None:
    sft = [
        *COMMON,
        "job_subdir=sft",
        "training_args.num_train_epochs=null",
        "training_args.max_steps=300",
    ]
    run_entrypoint("train_sft", sft, artifacts)
    start = accuracy(artifacts, "sft", "train_sft")
    (sft_model,) = job_dir(artifacts, "sft").rglob("final-model")
    policy = [f"model.model_name_or_path={sft_model}", "model.init_from_config=false"]

    # QRPO's quantile rewards: the correct answer vs the reference model's own samples.
    lines = Path(asset_path("tiny-tasks/train.jsonl")).read_text().splitlines()[:NUM_PAIRS]
    rows = [json.loads(line) for line in lines]
    for row, rewards in zip(rows, reference_rewards(sft_model, rows), strict=True):
        row["ref_rewards"] = rewards
    pairs_file = artifacts / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    results = {"sft": start}
    for trainer, extra in (
        ("dpo", ["trainer.beta=0.1"]),
        ("qrpo", ["trainer.beta=0.1", f"dataset.train.path={pairs_file}"]),
    ):
        args = [
            *COMMON,
            *policy,
            *extra,
            f"trainer={trainer}",
            f"job_subdir={trainer}",
            f"dataset.max_train_examples={NUM_PAIRS}",
            "training_args.learning_rate=5e-4",
        ]
        run_entrypoint("train_preference", args, artifacts)
        results[trainer] = accuracy(artifacts, trainer, "train_preference")
        (run_dir,) = run_dirs(artifacts, trainer, "train_preference")
        last = [m for m in read_metrics(run_dir) if "loss" in m][-1]
        for key in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "logits/chosen",
            "logits/rejected",
        ):
            assert key in last, key
        if trainer == "qrpo":
            for key in ("quantile_rewards/chosen", "beta_log_z", "targets/chosen"):
                assert key in last, key
        assert last["rewards/accuracies"] > 0.8
    print("held-out exact match", results)
    assert results["dpo"] > start + 0.02
    assert results["qrpo"] > start + 0.02
