"""Fault injection: the disk fills up during a checkpoint save (a small tmpfs, mounted as root;
skipped where the machine does not allow it). The run stops with one line (exit 74), the
partial save stays a temporary, the previous checkpoint is intact, and once space is freed the
same command resumes and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from post_training.errors import StorageFull
from post_training.utils.checkpointing import verify_checkpoint

from ..conftest import QUICK, final_weights, job_dir, run_entrypoint

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

ARGS = (*QUICK, "training_args.max_steps=6", "training_args.save_steps=2", "data.cache=false",
        "job_subdir=full", "resuming.resume=true")  # fmt: skip


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {probe.stderr}")
    subprocess.run(["umount", str(mount)], check=True)

    def mount_with(size: int) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                       check=True)  # fmt: skip
        return mount

    yield mount_with
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_save_with_one_line_and_the_run_resumes(
    tmp_path: Path, small_disk
) -> None:
    straight = tmp_path / "straight"
    run_entrypoint("train_sft", ARGS, straight)
    checkpoints = job_dir(straight, "full") / "checkpoints"
    one = tree_size(next(checkpoints.glob("*/checkpoint-6")))
    others = tree_size(straight) - tree_size(checkpoints)
    # Room for the run's own files and one and a half checkpoints: checkpoint-2 fits, 4 does not.
    disk = small_disk(others + one * 3 // 2 + 2**20)

    proc = run_entrypoint("train_sft", ARGS, disk, check=False)
    assert proc.returncode == StorageFull.exit_code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert "the disk is full" in line and "checkpoint-4 was not saved" in line
    assert "checkpoint-2 is intact" in line
    (kept,) = job_dir(disk, "full").glob("checkpoints/*/checkpoint-*")
    assert kept.name == "checkpoint-2" and verify_checkpoint(kept) is None
    assert list(job_dir(disk, "full").glob("checkpoints/*/.tmp-checkpoint-4"))

    subprocess.run(["mount", "-o", "remount,size=512m", str(disk)], check=True)
    resumed = run_entrypoint("train_sft", ARGS, disk)
    assert "Resumed at step 2 " in resumed.stdout + resumed.stderr
    a, b = final_weights(straight, "full"), final_weights(disk, "full")
    for name in a:
        assert torch.equal(a[name], b[name]), name
