"""End to end (marked e2e): the alignment data chain on the embedded task, as its reproducibility
script runs it — reference completions in 2 partitions, reference log-probs, rewards, QRPO pairs,
merge, QRPO on the precomputed columns — raises held-out accuracy over the SFT start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.e2e
SCRIPT = REPO / "reproducibility-scripts/alignment/tiny-end-to-end/run.sh"


def test_tiny_alignment_chain_qrpo_beats_the_sft_start(
    artifacts: Path, tiny_sft_start: Path
) -> None:
    env = {
        **os.environ,
        "POST_TRAINING_ARTIFACTS_DIR": str(artifacts),
        "PYTHON": sys.executable,
        "SFT_MODEL": str(tiny_sft_start),
        "NUM_PROMPTS": "4000",
        "PARTITIONS": "2",
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("tiny alignment chain", result)

    alignment = artifacts / "tiny-end-to-end/alignment-data/tiny-tasks/tiny"
    generated = sorted((alignment / "generate_ref_completions").glob("partition-*"))
    assert [p.name for p in generated] == ["partition-00000-of-00002", "partition-00001-of-00002"]
    rows = [json.loads(x) for x in (alignment / "prepare_train_dataset/merged/rows.jsonl").open()]
    assert len(rows) == result["pairs"] > 200
    for row in rows[:50]:
        assert row["chosen_reward"] > row["rejected_reward"]
        assert len(row["ref_rewards"]) == 4 and "ref_chosen_logps" in row
        assert 0 <= row["rejected_quantile_reward"] < row["chosen_quantile_reward"] <= 1
    assert result["qrpo_accuracy"] >= result["sft_accuracy"] + 0.01
