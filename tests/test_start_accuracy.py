"""The end-of-run comparison with the start model (``evaluation.compare_start``): the start
checkpoint's own exact-match file is reused only when it scored the same examples with the same
generation length; otherwise the start is scored now, into the run dir, never into the start
checkpoint (a user's input is not written to)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from post_training.exact_match import start_accuracy
from post_training.frame import start_model
from post_training.utils.config import asset_path

pytestmark = pytest.mark.e2e  # needs the session's SFT start (a 300-step training)

SPLIT = {"transform": "messages", "keep_columns": ["answer", "task"]}
DATASET = {  # configs/dataset/tiny-tasks.yaml
    "name": "tiny-tasks",
    "train": {"path": asset_path("tiny-tasks/train.jsonl"), **SPLIT},
    "eval": {"path": asset_path("tiny-tasks/eval.jsonl"), **SPLIT},
    "answer_field": "answer",
    "task_field": "task",
}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_start_accuracy_reuses_its_own_file_or_scores_into_the_run_dir(
    tiny_sft_start: Path, tmp_path: Path
) -> None:
    start = tmp_path / "start"
    shutil.copytree(tiny_sft_start, start)
    saved = json.loads((start / "eval-tiny-tasks.json").read_text())
    assert saved["max_new_tokens"] == 16 and saved["num_examples"] == 400
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = _snapshot(start)

    # the same 400 examples at 16 new tokens: the start's own result, nothing scored or written
    assert start_accuracy(start, run_dir, DATASET, 400, None, 16, 200, "float32") == saved
    assert not list(run_dir.iterdir())

    # another generation length, or fewer examples: scored now, written to the run dir only
    shorter = start_accuracy(start, run_dir, DATASET, 100, 100, 16, 200, "float32")
    assert shorter["num_examples"] == 100
    written = json.loads((run_dir / "eval-start-tiny-tasks.json").read_text())
    assert written["accuracy"] == shorter["accuracy"]
    assert _snapshot(start) == before

    # no file at the start: scored, and equal to what the start's own evaluation found
    (start / "eval-tiny-tasks.json").unlink()
    again = start_accuracy(start, run_dir, DATASET, 400, None, 16, 200, "float32")
    assert again["accuracy"] == saved["accuracy"] and again["per_task"] == saved["per_task"]
    assert sorted(p.name for p in start.iterdir()) == sorted(
        n for n in before if n != "eval-tiny-tasks.json"
    )


def test_start_model_only_for_a_saved_checkpoint_with_the_comparison_on(
    tiny_sft_start: Path, tmp_path: Path
) -> None:
    def config(path: object, init: bool = False, compare: bool = True) -> dict:
        return {
            "model": {"model_name_or_path": str(path), "init_from_config": init},
            "evaluation": {"compare_start": compare},
        }

    assert start_model(config(tiny_sft_start), tmp_path) == (tiny_sft_start, tmp_path)
    assert start_model(config(tiny_sft_start, init=True), tmp_path) is None
    assert start_model(config(tiny_sft_start, compare=False), tmp_path) is None
    assert start_model(config(tmp_path / "missing"), tmp_path) is None
