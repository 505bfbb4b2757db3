"""lm-eval harness: the shipped ``tiny_tasks`` task scores a checkpoint exactly as our own
exact match does; the training callback logs ``harness/...`` at its steps; bad tasks, a missing
lm-eval and uncached Hub datasets are one line each (no network: ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from post_training.errors import ConfigError
from post_training.harness import DEFAULT_INCLUDE_PATH, flat_metrics, require_lm_eval
from post_training.schema import check
from post_training.utils.config import CONFIGS_DIR
from tests.conftest import QUICK, REPO, final_weights, read_metrics, run_dirs, run_entrypoint

pytest.importorskip("lm_eval")


def composed(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose(name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def fake_checkpoint(directory: Path) -> Path:
    """Enough of a checkpoint for the checks that run before any model is loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- agreement
@pytest.mark.e2e
def test_tiny_tasks_through_lm_eval_equals_our_exact_match(
    tiny_sft_start: Path, tmp_path: Path
) -> None:
    """One ``evaluate`` run, both scorers, the same 100 examples of the trained tiny model."""
    ours, harness = tmp_path / "ours.json", tmp_path / "harness.json"
    proc = run_entrypoint(
        "evaluate",
        [
            f"model_path={tiny_sft_start}",
            "max_examples=100",
            f"output_file={ours}",
            "harness.tasks=[tiny_tasks]",
            "harness.limit=100",
            f"harness.output_file={harness}",
        ],
        tmp_path / "artifacts",
    )
    exact = json.loads(ours.read_text())
    result = json.loads(harness.read_text())
    assert exact["num_examples"] == 100 and result["n-samples"]["tiny_tasks"]["effective"] == 100
    assert exact["accuracy"] > 0.1  # a model that learnt something: the agreement means a lot
    assert result["metrics"]["harness/tiny_tasks/exact_match"] == pytest.approx(exact["accuracy"])
    assert result["versions"]["lm_eval"].startswith("0.4.")
    assert result["configs"]["tiny_tasks"]["generation_kwargs"]["max_gen_toks"] == 16
    assert result["settings"]["apply_chat_template"] is True
    assert "tiny_tasks  exact_match" in proc.stdout  # the table


@pytest.mark.e2e
def test_training_logs_harness_metrics_at_its_steps(artifacts: Path) -> None:
    """Steps 10 and 20 of 20; the training itself does not notice (same final weights)."""
    base = [*QUICK, "training_args.max_steps=20"]
    harness = [
        "evaluation.harness_every=10",
        "evaluation.harness_tasks=[tiny_tasks]",
        "evaluation.harness_limit=20",
    ]
    run_entrypoint("train_sft", [*base, *harness, "job_subdir=harness"], artifacts)
    (run_dir,) = run_dirs(artifacts, "harness")
    logged = [m for m in read_metrics(run_dir) if "harness/tiny_tasks/exact_match" in m]
    assert [m["step"] for m in logged] == [10, 20]
    assert all(0.0 <= m["harness/tiny_tasks/exact_match"] <= 1.0 for m in logged)
    run_entrypoint("train_sft", [*base, "job_subdir=plain"], artifacts)
    with_harness, plain = final_weights(artifacts, "harness"), final_weights(artifacts, "plain")
    assert all(torch.equal(with_harness[k], plain[k]) for k in plain)


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("config", ["train-sft", "train-preference"])
def test_harness_every_needs_tasks(config: str) -> None:
    with pytest.raises(ConfigError) as error:
        check(composed(config, ["evaluation.harness_every=10"]))
    message = str(error.value)
    assert "evaluation.harness_tasks=[]" in message and "harness_every=10" in message
    typed = check(composed(config, ["evaluation.harness_every=10", "evaluation.harness_tasks=[x]"]))
    assert typed.evaluation.harness_tasks == ["x"]


def test_evaluate_needs_something_to_evaluate() -> None:
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        check(composed("evaluate", ["model_path=x", "exact_match=false"]))
    assert check(composed("evaluate", ["model_path=x"])).harness.include_path == str(
        DEFAULT_INCLUDE_PATH
    )


def test_unknown_task_is_one_line_with_close_matches(tmp_path: Path) -> None:
    proc = run_entrypoint(
        "evaluate",
        [f"model_path={fake_checkpoint(tmp_path / 'model')}", "harness.tasks=[arc_easi]"],
        tmp_path / "artifacts",
        check=False,
    )
    line = one_error_line(proc)
    assert "harness.tasks" in line and "'arc_easi'" in line and "arc_easy" in line


def test_uncached_hub_dataset_offline_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "hf"
    proc = run_entrypoint(
        "evaluate",
        [f"model_path={fake_checkpoint(tmp_path / 'model')}", "harness.tasks=[gsm8k]"],
        tmp_path / "artifacts",
        check=False,
        env={
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(empty),
            "HF_DATASETS_CACHE": str(empty / "datasets"),
        },
    )
    line = one_error_line(proc)
    assert "'gsm8k'" in line and "openai/gsm8k" in line
    assert "HF_HUB_OFFLINE=0 python -m post_training.evaluate" in line


def test_without_lm_eval_the_package_imports_and_a_harness_task_is_one_line() -> None:
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import post_training.harness, post_training.evaluate, post_training.frame\n"
        "from post_training.harness import Harness\n"
        "try:\n"
        "    Harness(['tiny_tasks'])\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ConfigError harness.tasks=['tiny_tasks']: needs lm-eval")
    assert "pip install 'post-training[eval]'" in proc.stdout


def test_require_lm_eval_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"^evaluation.harness_tasks=\['x'\]: needs lm-eval"):
        require_lm_eval("evaluation.harness_tasks=['x']")


def test_flat_metrics_names() -> None:
    raw = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.5,
                "exact_match_stderr,strict-match": 0.1,
                "exact_match,flexible-extract": 0.6,
            },
            "tiny_tasks": {"sample_len": 10, "exact_match,none": 0.25},
        }
    }
    assert flat_metrics(raw) == {
        "harness/gsm8k/exact_match/strict-match": 0.5,
        "harness/gsm8k/exact_match/flexible-extract": 0.6,
        "harness/tiny_tasks/exact_match": 0.25,
    }
