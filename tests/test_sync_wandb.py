"""sync_wandb: listing and dry-run selection of real offline wandb runs (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from post_training.launch.sync_wandb import find_offline_runs, parse_choice

from .conftest import REPO

# Two run dirs laid out as the trainer lays them out, each with a real offline wandb run.
MAKE_RUNS = """
import sys, wandb
for run_dir, name, run_id in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    run = wandb.init(project="pt-test", name=name, id=run_id, dir=run_dir, mode="offline")
    run.log({"loss": 1.0}, step=1)
    run.finish()
"""
RUNS = {  # job_subdir -> (run name, wandb id)
    "sweep/alpha": ("alpha_lr-0.001", "alpha0001"),
    "sweep/beta": ("beta_lr-0.002", "beta0002"),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wandb") / "artifacts"
    argv = []
    for job, (name, run_id) in RUNS.items():
        run_dir = root / "private/outputs/train_sft" / job / "runs/2026-01-01_00-00-00-000000"
        run_dir.mkdir(parents=True)
        config = {"job_subdir": job, "wandb": {"run_name": name, "project": "pt-test"}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        argv += [str(run_dir), name, run_id]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run(
        [sys.executable, "-c", MAKE_RUNS, *argv], env=env, check=True, timeout=300, cwd=root
    )
    # beta has been synced already: wandb leaves this marker beside the run file.
    (beta,) = root.rglob("offline-run-*-beta0002")
    (beta / "run-beta0002.wandb.synced").write_text("")
    return root


def sync_wandb(artifacts: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "post_training.launch.sync_wandb", "--root", str(artifacts), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_finds_offline_runs_with_names_from_the_run_config(artifacts: Path) -> None:
    runs = find_offline_runs(artifacts)
    assert [(r.name, r.job, r.project, r.synced) for r in runs] == [
        ("alpha_lr-0.001", "sweep/alpha", "pt-test", False),
        ("beta_lr-0.002", "sweep/beta", "pt-test", True),
    ]
    for run in runs:
        assert run.path.parent.name == "wandb" and run.path.name.startswith("offline-run-")
        assert list(run.path.glob("run-*.wandb"))


def test_list_shows_every_run_and_its_status(artifacts: Path) -> None:
    proc = sync_wandb(artifacts, "--list")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "_lr-" in line]
    assert len(lines) == 2
    assert any("alpha_lr-0.001" in line and "offline" in line for line in lines)
    assert any("beta_lr-0.002" in line and "synced" in line for line in lines)


def test_dry_run_by_name_pattern_and_all(artifacts: Path) -> None:
    (alpha,) = artifacts.rglob("offline-run-*-alpha0001")
    (beta,) = artifacts.rglob("offline-run-*-beta0002")
    by_name = sync_wandb(artifacts, "alpha_lr-0.001", "--dry-run")
    assert by_name.returncode == 0, by_name.stderr
    assert f"sync {alpha}" in by_name.stdout and str(beta) not in by_name.stdout
    by_glob = sync_wandb(artifacts, "sweep/*", "--dry-run")
    assert str(alpha) in by_glob.stdout and str(beta) in by_glob.stdout
    unsynced = sync_wandb(artifacts, "--all", "--dry-run")
    assert str(alpha) in unsynced.stdout and str(beta) not in unsynced.stdout
    everything = sync_wandb(artifacts, "--all", "--include-synced", "--dry-run")
    assert everything.stdout.count("would run:") == 2
    missing = sync_wandb(artifacts, "gamma*", "--dry-run")
    assert missing.returncode != 0 and "matches 'gamma*'" in missing.stderr


def test_interactive_choice_by_number(artifacts: Path) -> None:
    (alpha,) = artifacts.rglob("offline-run-*-alpha0001")
    proc = sync_wandb(artifacts, "--dry-run", stdin="1\n")
    assert proc.returncode == 0, proc.stderr
    assert "Runs to sync" in proc.stdout
    assert proc.stdout.count("would run:") == 1 and f"sync {alpha}" in proc.stdout
    quit_ = sync_wandb(artifacts, "--dry-run", stdin="\n")
    assert quit_.returncode == 0 and "would run:" not in quit_.stdout


def test_parse_choice() -> None:
    assert parse_choice("1 3-4, 2", 5) == [0, 2, 3, 1]
    assert parse_choice("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        parse_choice("6", 5)
    with pytest.raises(ValueError):
        parse_choice("x", 5)
