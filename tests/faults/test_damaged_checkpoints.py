"""Fault injection: a damaged newest checkpoint resumes from the previous good one and ends
bit-identical to an uninterrupted run; every checkpoint damaged is one clear error (or a fresh
start with ``resuming.fresh_start_if_damaged``). Real trainings of the tiny model (marked e2e).

One uninterrupted run and one run killed (SIGKILL, at the start of its step-12 save) after
complete checkpoints 4 and 8 are shared by the module; each case damages a copy of the killed
run's checkpoint 8 and resumes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from post_training.frame import EXIT_CODE_PROJECT_ERROR
from post_training.utils.checkpointing import MANIFEST_FILE

from ..conftest import QUICK, final_weights, job_dir, run_entrypoint, run_killed_at

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

COMMON = (*QUICK, "training_args.max_steps=12", "training_args.save_steps=4")
RESUMABLE = (*COMMON, "job_subdir=damaged", "resuming.resume=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    """The uninterrupted run's final weights, and the artifacts of the killed resumable run."""
    straight = tmp_path_factory.mktemp("straight")
    run_entrypoint("train_sft", [*COMMON, "job_subdir=straight"], straight)
    killed = tmp_path_factory.mktemp("killed")
    run_killed_at("train_sft", RESUMABLE, killed, "checkpoint-saved-state@12")
    names = sorted(p.name for p in job_dir(killed, "damaged").glob("checkpoints/*/checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-8"], names
    return final_weights(straight, "straight"), killed


def copy_of(killed: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the killed run's artifacts, and its checkpoint dir."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(killed, artifacts, symlinks=True)
    (checkpoints,) = job_dir(artifacts, "damaged").glob("checkpoints/*/")
    return artifacts, checkpoints


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def garbage_of_its_length(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes((b"not json {" * (size // 10 + 1))[:size])


DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "optimizer-truncated": ("optimizer.bin", truncate, "optimizer.bin has"),
    "weights-truncated": ("model.safetensors", truncate, "model.safetensors has"),
    "state-garbage": ("trainer_state.json", garbage_of_its_length, "trainer_state.json does not"),
    "weights-deleted": ("model.safetensors", Path.unlink, "model.safetensors is missing"),
    "rng-deleted": ("random_states_0.pkl", Path.unlink, "random_states_0.pkl is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(
    runs: tuple[dict[str, torch.Tensor], Path], tmp_path: Path, damage: str
) -> None:
    reference, killed = runs
    artifacts, checkpoints = copy_of(killed, tmp_path)
    name, do, said = DAMAGES[damage]
    do(checkpoints / "checkpoint-8" / name)

    proc = run_entrypoint("train_sft", RESUMABLE, artifacts)
    output = proc.stdout + proc.stderr
    assert said in output, output[-3000:]
    assert "Resumed at step 4 " in output
    assert (checkpoints / "checkpoint-8.damaged" / MANIFEST_FILE).is_file()
    weights = final_weights(artifacts, "damaged")
    assert weights.keys() == reference.keys()
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key


def test_a_checkpoint_that_verifies_but_fails_to_load_falls_back_too(
    runs: tuple[dict[str, torch.Tensor], Path], tmp_path: Path
) -> None:
    """``resuming.verify=size`` checks sizes only: same-length garbage in the optimizer state
    passes the manifest, fails to load, and the previous checkpoint is used."""
    reference, killed = runs
    artifacts, checkpoints = copy_of(killed, tmp_path)
    garbage_of_its_length(checkpoints / "checkpoint-8" / "optimizer.bin")
    proc = run_entrypoint("train_sft", [*RESUMABLE, "resuming.verify=size"], artifacts)
    output = proc.stdout + proc.stderr
    assert "checkpoint-8: failed to load" in output, output[-3000:]
    assert "Resumed at step 4 " in output
    assert (checkpoints / "checkpoint-8.damaged").is_dir()
    weights = final_weights(artifacts, "damaged")
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key


def test_no_good_checkpoint_is_one_error_or_a_fresh_start_with_the_flag(
    runs: tuple[dict[str, torch.Tensor], Path], tmp_path: Path
) -> None:
    reference, killed = runs
    artifacts, checkpoints = copy_of(killed, tmp_path)
    truncate(checkpoints / "checkpoint-4" / "model.safetensors")
    (checkpoints / "checkpoint-8" / "random_states_0.pkl").unlink()

    refused = run_entrypoint("train_sft", RESUMABLE, artifacts, check=False)
    assert refused.returncode == EXIT_CODE_PROJECT_ERROR
    assert "Traceback" not in refused.stderr
    assert "no checkpoint in" in refused.stderr and "verifies" in refused.stderr
    assert "checkpoint-4: model.safetensors has" in refused.stderr
    assert "checkpoint-8: random_states_0.pkl is missing" in refused.stderr
    assert "fresh_start_if_damaged" in refused.stderr
    assert not list(job_dir(artifacts, "damaged").rglob("final-model"))

    run_entrypoint("train_sft", [*RESUMABLE, "resuming.fresh_start_if_damaged=true"], artifacts)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*.damaged")) == [
        "checkpoint-4.damaged",
        "checkpoint-8.damaged",
    ]
    weights = final_weights(artifacts, "damaged")
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key
