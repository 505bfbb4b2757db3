"""End to end: the README's main job (the default ``train_sft`` run) and the evaluation of its
final model against the untrained start (marked e2e; the longest test of the suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import job_dir, read_metrics, run_dirs, run_entrypoint, save_initial_model

pytestmark = pytest.mark.e2e


def test_default_run_learns_and_evaluate_reports_accuracy(artifacts: Path) -> None:
    """The README's main job: no overrides but where artifacts go and wandb offline."""
    # 2,500 steps: ~9 min alone on 2 cores, ~11 min on one xdist worker's core; the limit only
    # catches a hang (a loaded machine has taken 0.85 s/step).
    args = ["wandb.mode=offline", "job_subdir=default"]
    run_entrypoint("train_sft", args, artifacts, timeout=3600)
    (run_dir,) = run_dirs(artifacts, "default")
    (final,) = job_dir(artifacts, "default").rglob("final-model")
    trained = json.loads((final / "eval-tiny-tasks.json").read_text())
    # Untrained baseline: the same init, scored by the evaluate entrypoint.
    untrained_model = save_initial_model(artifacts / "untrained-model")
    run_entrypoint("evaluate", [f"model_path={untrained_model}"], artifacts)
    untrained = json.loads((untrained_model / "eval-tiny-tasks.json").read_text())
    print("trained", trained["accuracy"], trained["per_task"], "untrained", untrained["accuracy"])
    assert trained["num_examples"] == untrained["num_examples"] == 400
    assert trained["accuracy"] >= 0.5
    assert trained["accuracy"] > untrained["accuracy"] + 0.4
    # Run dir contents: frozen config, metrics with the documented fields, trackers.
    assert (run_dir / "config.yaml").is_file()
    metrics = read_metrics(run_dir)
    train_events = [m for m in metrics if "loss" in m]
    for key in ("step", "loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second"):
        assert key in train_events[-1]
    assert train_events[-1]["loss"] < train_events[0]["loss"]
    assert any("eval_loss" in m for m in metrics)
    assert metrics[-1]["eval_accuracy"] == trained["accuracy"]
    # Teacher-forced exact match of the last turn = greedy generation's exact match (up to
    # argmax near-ties between left- and right-padded forwards).
    (final_eval,) = [m for m in metrics if "eval_loss" in m and m["step"] == metrics[-1]["step"]]
    assert abs(final_eval["eval_sequence_exact_match"] - trained["accuracy"]) <= 2 / 400
    assert list((run_dir / "tensorboard").iterdir())
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (final / name).is_file()
