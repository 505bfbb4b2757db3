"""Smoke test of the training benchmark (``benchmarks/run.py``): one CPU scenario at tiny sizes,
ours and TRL each run once in their own process; the GPU scenarios skip on a CPU machine.
Speed is never asserted, only that every reported field is there and sane."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import run as bench

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench-run")
    out = root / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POST_TRAINING_ARTIFACTS_DIR", str(root / "artifacts"))  # tokenizer cache
        returned = bench.main(["sft-cpu", "sft-gpu", "dpo-gpu", "--quick", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["command"] == returned["command"]
    return report


def test_cpu_scenario_fields(report: dict) -> None:
    assert report["command"].startswith("python -m benchmarks.run sft-cpu sft-gpu dpo-gpu --quick")
    result = report["scenarios"]["sft-cpu"]
    assert result["settings"]["precision"] == "fp32"
    assert result["peak_flops"] > 0
    (row,) = result["rows"]
    assert row["variant"] == "packed"
    for impl in ("ours", "plain", "trl"):
        r = row[impl]
        assert len(r["runs"]) == 1
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert 0 <= r["step_memory_gb"] < r["peak_memory_gb"]
        assert 0 < r["mfu"] <= 1
        (run,) = r["runs"]
        assert run["timed_steps"] == 2 and len(run["step_times_s"]) == 2
    # Identical work: the same packed token count per step (both pack the same documents
    # into rows of max_length, best fit decreasing) within a few tokens.
    assert row["ours"]["tokens_per_step"] == pytest.approx(row["trl"]["tokens_per_step"], rel=0.1)
    # The plain-loss arm is our loop on the same packed rows: exactly the same tokens.
    assert row["plain"]["tokens_per_step"] == row["ours"]["tokens_per_step"]
    assert set(row["ratio_plain"]) == set(row["ratio"])
    assert set(row["ratio"]) == {
        "tokens_per_s",
        "tokens_per_cpu_s",
        "examples_per_s",
        "peak_memory",
        "step_memory",
        "mfu",
    }
    assert set(result["targets"]) == {
        "mfu >= 60%",
        "tokens/s >= 10x TRL",
        "tokens/s > TRL",
        "peak memory <= TRL",
        "peak memory <= 0.75x plain loss",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU scenarios run on a GPU machine")
def test_gpu_scenarios_skip_with_a_reason(report: dict) -> None:
    for name in ("sft-gpu", "dpo-gpu"):
        assert "torch.cuda.is_available() is False" in report["scenarios"][name]["skipped"]


def test_unknown_scenario_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["sft-tpu"])
    assert "unknown scenario" in capsys.readouterr().err


def test_pairs_fit_the_max_length(tmp_path: Path) -> None:
    from benchmarks.data_prep import build_tokenizer

    tokenizer = build_tokenizer(str(tmp_path))
    stats = bench.write_pairs(tmp_path / "pairs.jsonl", 12, 160, tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert stats["pairs"] == len(rows) == 12
    for row in rows:
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
        assert row["chosen"] != row["rejected"]
