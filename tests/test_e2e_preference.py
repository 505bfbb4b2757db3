"""End to end: SFT the tiny model briefly, then DPO and QRPO on pairs of the embedded task
(correct vs wrong answer) raise held-out exact-match accuracy above the SFT start (marked e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from post_training.data_alignment.preference import tiny_task_reward
from post_training.utils.config import asset_path

from .conftest import job_dir, read_metrics, run_dirs, run_entrypoint

pytestmark = pytest.mark.e2e

COMMON = ["wandb.mode=disabled", "tensorboard=false", "training_args.logging_steps=5"]
NUM_PROMPTS = 4000


@torch.no_grad()
def on_policy_pairs(model_dir: Path, rows: list[dict], k: int = 4) -> list[dict]:
    """Preference rows from the reference (SFT) model's own samples: chosen = the correct
    answer, rejected = the reference's worst sample (skipped when all k are correct), with the
    rewards of the k samples as ``ref_rewards`` (exact match, partial credit when wrong)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    pairs = []
    for start in range(0, len(rows), 250):
        chunk = rows[start : start + 250]
        prompts = [r["messages"][:-1] for r in chunk]
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=True,
            max_new_tokens=12,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, (row, prompt) in enumerate(zip(chunk, prompts, strict=True)):
            samples = [a.strip() for a in new[i * k : (i + 1) * k]]
            rewards = [tiny_task_reward(a, row["answer"]) for a in samples]
            worst = min(range(k), key=lambda j: rewards[j])
            if rewards[worst] == 1.0 or not samples[worst]:
                continue
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": row["answer"],
                    "rejected": samples[worst],
                    "chosen_reward": 1.0,
                    "rejected_reward": rewards[worst],
                    "ref_rewards": rewards,
                }
            )
    return pairs


def accuracy(artifacts: Path, job: str, entrypoint: str) -> float:
    (final,) = job_dir(artifacts, job, entrypoint).rglob("final-model")
    return json.loads((final / "eval-tiny-tasks.json").read_text())["accuracy"]


def test_dpo_and_qrpo_improve_on_the_sft_start(artifacts: Path, tiny_sft_start: Path) -> None:
    sft_model = tiny_sft_start
    start = json.loads((sft_model / "eval-tiny-tasks.json").read_text())["accuracy"]
    policy = [f"model.model_name_or_path={sft_model}", "model.init_from_config=false"]

    # On-policy pairs: the correct answer vs the SFT model's worst of 4 samples, whose rewards
    # give QRPO its quantile rewards.
    lines = Path(asset_path("tiny-tasks/train.jsonl")).read_text().splitlines()[:NUM_PROMPTS]
    pairs = on_policy_pairs(sft_model, [json.loads(line) for line in lines])
    pairs_file = artifacts / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    data = [
        f"dataset.train.path={pairs_file}",
        "dataset.train.transform=preference",
        "dataset.eval=null",
        "training_args.learning_rate=5e-4",
    ]

    results = {"sft": start}
    # DPO with its NLL term (RPO): plain sigmoid DPO lowers both log-probs on this task.
    for trainer, extra in (("dpo", ["trainer.nll_weight=1.0"]), ("qrpo", [])):
        args = [*COMMON, *policy, *data, *extra, f"trainer={trainer}", f"job_subdir={trainer}"]
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
        assert last["rewards/accuracies"] > 0.5
    print("held-out exact match", results)
    assert results["dpo"] >= start + 0.02
    assert results["qrpo"] >= start + 0.01


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
