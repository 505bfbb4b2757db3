"""End to end (marked e2e): the alignment data chain on the embedded task, as its reproducibility
script runs it — 4 reference completions per prompt in 2 partitions, reference log-probs,
partial-credit rewards, pairs (the task's answer vs the worst completion), merge, QRPO on the
precomputed columns — and DPO (+NLL) and KTO on the same pairs: each raises held-out exact-match
accuracy over the SFT start, and logs the metrics TRL names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, job_dir, read_metrics, run_dirs, run_entrypoint

pytestmark = pytest.mark.e2e
SCRIPT = REPO / "reproducibility-scripts/alignment/tiny-end-to-end/run.sh"
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def _last_train_metrics(artifacts: Path, job: str, subdir: str) -> dict:
    root = job_dir(artifacts, job, "train_preference", subdir)
    (run_dir,) = sorted((root / "runs").iterdir())
    return [m for m in read_metrics(run_dir) if "loss" in m][-1]


def test_tiny_alignment_chain_improves_on_the_sft_start(
    artifacts: Path, tiny_sft_start: Path
) -> None:
    env = {
        **os.environ,
        "POST_TRAINING_ARTIFACTS_DIR": str(artifacts),
        "PYTHON": sys.executable,
        "SFT_MODEL": str(tiny_sft_start),
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=2400
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    alignment = artifacts / "tiny-end-to-end/alignment-data/tiny-tasks/tiny"
    generated = sorted((alignment / "generate_ref_completions").glob("partition-*"))
    assert [p.name for p in generated] == ["partition-00000-of-00002", "partition-00001-of-00002"]
    rows_file = alignment / "prepare_train_dataset/merged/rows.jsonl"
    rows = [json.loads(x) for x in rows_file.open()]
    assert len(rows) == result["pairs"] > 3000
    for row in rows[:100]:
        assert row["chosen_reward"] == 1.0 > row["rejected_reward"]
        assert len(row["ref_rewards"]) == 4 and "ref_chosen_logps" in row
        assert 0 < row["rejected_quantile_reward"] <= row["chosen_quantile_reward"] == 1.0
    qrpo = _last_train_metrics(artifacts, "tiny-end-to-end-qrpo", "tiny-end-to-end")
    for key in (*PAIR_METRICS, "quantile_rewards/chosen", "beta_log_z", "targets/chosen"):
        assert key in qrpo, key

    def train_on_pairs(job: str, overrides: list[str]) -> subprocess.CompletedProcess[str]:
        args = [
            "wandb.mode=disabled",
            "tensorboard=false",
            f"job_subdir={job}",
            f"model.model_name_or_path={tiny_sft_start}",
            "model.init_from_config=false",
            "dataset=alignment-prepared",
            f"dataset.train.path={rows_file}",
            "training_args.logging_steps=5",
            *overrides,
        ]
        proc = run_entrypoint("train_preference", args, artifacts)
        (final,) = job_dir(artifacts, job, "train_preference").rglob("final-model")
        result[f"{job}_accuracy"] = json.loads((final / "eval-tiny-tasks.json").read_text())[
            "accuracy"
        ]
        return proc

    # DPO with its NLL term (RPO) on the same pairs: plain sigmoid DPO lowers both log-probs here.
    dpo = ["trainer=dpo", "trainer.nll_weight=1.0", "training_args.learning_rate=5e-4"]
    proc_dpo = train_on_pairs("dpo", dpo)
    (run_dir,) = run_dirs(artifacts, "dpo", "train_preference")
    assert "Reference log-probs: dataset" in (run_dir / "train_preference.log").read_text()
    # the run compares itself with its start (the start's own eval file, same 400 examples)
    final_metrics = [m for m in read_metrics(run_dir) if "eval_accuracy_start" in m][-1]
    assert final_metrics["eval_accuracy_start"] == result["sft_accuracy"]
    assert final_metrics["eval_accuracy_gain"] == pytest.approx(
        result["dpo_accuracy"] - result["sft_accuracy"]
    )
    assert "at the start (" in proc_dpo.stdout
    last = _last_train_metrics(artifacts, "dpo", "private")
    assert all(key in last for key in PAIR_METRICS) and last["rewards/accuracies"] > 0.5
    # KTO on the same pairs split in two (β 1: the replies are a few tokens long; the answers
    # weighted 2: pushing a near-miss down also pulls down the prefix it shares with the answer).
    kto = [
        "trainer=kto",
        "dataset.unpair=true",
        "trainer.beta=1.0",
        "trainer.desirable_weight=2.0",
        "training_args.learning_rate=1e-4",
        "training_args.num_train_epochs=2",
    ]
    train_on_pairs("kto", kto)
    print("tiny alignment chain", result)
    assert result["dpo_accuracy"] >= result["sft_accuracy"] + 0.015
    # QRPO at the script's settings (β 0.5, 3 epochs, lr 1e-3): +0.020, +0.020 and +0.033 over
    # this start on seeds 42, 1 and 2 (measured 2026-12-06); one epoch at β 0.1 left it within
    # noise of the start.
    assert result["qrpo_accuracy"] >= result["sft_accuracy"] + 0.01
    assert result["kto_accuracy"] >= result["sft_accuracy"] + 0.01
