"""One launch per resume target: the job lock (flock and heartbeat), its release when the holder
is killed, and two concurrent launches of one job (marked faults; the launch test is e2e)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from post_training.utils import job_lock
from post_training.utils.job_lock import (
    EXIT_CODE_LOCKED,
    LOCK_FILE,
    JobLocked,
    LockSettings,
    acquire,
)

from ..conftest import QUICK, REPO, job_dir, start_entrypoint

pytestmark = pytest.mark.faults

HOLD = """
import sys, time
from post_training.utils.job_lock import acquire, LockSettings
acquire(sys.argv[1], LockSettings(mode=sys.argv[2], heartbeat_s=0.2, stale_after_s=60))
print("held", flush=True)
time.sleep(600)
"""


def holder(directory: Path, mode: str) -> subprocess.Popen:
    """Another process holding the lock of ``directory``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(autouse=True)
def _release() -> None:
    yield
    job_lock.release_all()


@pytest.mark.parametrize("mode", ["flock", "heartbeat"])
def test_a_held_lock_refuses_with_the_holder_and_kill_9_releases_it(
    tmp_path: Path, mode: str
) -> None:
    other = holder(tmp_path, mode)
    with pytest.raises(JobLocked) as refused:
        acquire(tmp_path, LockSettings(mode=mode))
    message = str(refused.value)
    assert f"pid {other.pid}" in message and f"host {socket.gethostname()}" in message
    assert str(tmp_path) in message and "started 20" in message
    assert refused.value.exit_code == EXIT_CODE_LOCKED
    other.send_signal(signal.SIGKILL)
    other.wait()
    lock = acquire(tmp_path, LockSettings(mode=mode))  # the kernel released it / a dead pid
    assert lock is not None
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_heartbeat_lock_of_another_host_is_taken_over_only_when_stale(tmp_path: Path) -> None:
    record = {"host": "another-node", "pid": 12345, "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    settings = LockSettings(mode="heartbeat", heartbeat_s=1, stale_after_s=30)
    with pytest.raises(JobLocked, match=r"host another-node, pid 12345.*last heartbeat"):
        acquire(tmp_path, settings)
    old = time.time() - 31
    os.utime(tmp_path / LOCK_FILE, (old, old))
    assert acquire(tmp_path, settings) is not None
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_heartbeat_keeps_a_live_lock_fresh_and_release_removes_it(tmp_path: Path) -> None:
    lock = acquire(tmp_path, LockSettings(mode="heartbeat", heartbeat_s=0.05, stale_after_s=1))
    assert lock is not None
    old = time.time() - 100
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 1
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_none_takes_nothing_and_a_bad_mode_is_named(tmp_path: Path) -> None:
    assert acquire(tmp_path, LockSettings(mode="none")) is None
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(Exception, match=r"resuming\.lock=.nfs."):
        acquire(tmp_path, LockSettings(mode="nfs"))


@pytest.mark.e2e
def test_two_concurrent_launches_one_trains_the_other_exits_at_once(tmp_path: Path) -> None:
    args = [
        *QUICK,
        "training_args.max_steps=3000",
        "training_args.save_steps=3",
        "training_args.save_total_limit=1",
        "job_subdir=twice",
        "resuming.resume=true",
    ]
    first = start_entrypoint("train_sft", args, tmp_path)
    checkpoints = job_dir(tmp_path, "twice") / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("*/checkpoint-*")):  # training, saving every 3 steps
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first launch never saved a checkpoint"
            time.sleep(0.1)
        started = time.monotonic()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the first is not reaped yet
        second = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "post_training.train_sft", *args],
            cwd=REPO,
            env={**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        assert second.returncode == EXIT_CODE_LOCKED, second.stderr[-3000:]
        # "At once": it refuses before importing torch, and spends under 5 CPU-seconds doing so
        # (CPU time, not wall time: the first launch's training holds the cores meanwhile).
        imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines()}
        assert "torch" not in imported and "transformers" not in imported
        assert cpu < 5, f"the second launch used {cpu:.1f} s of CPU to exit ({took:.1f} s wall)"
        assert took < 5, f"the second launch took {took:.1f} s to exit"
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        # Only Hydra's log of the refused launch: no frozen config, nothing in the job's dirs.
        runs = sorted((job_dir(tmp_path, "twice") / "runs").iterdir())
        assert [(r / "config.yaml").exists() for r in runs] == [True, False][: len(runs)]
        print(f"the second launch exited {EXIT_CODE_LOCKED} in {took:.2f} s ({cpu:.2f} s CPU)")
        time.sleep(1.0)  # the first launch keeps training and saving, untouched
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGUSR1)
        first.communicate(timeout=120)  # drains its pipes (a full pipe would block it)
    assert first.returncode == 75
    (checkpoint,) = checkpoints.glob("*/checkpoint-*")
    assert (checkpoint / "manifest.json").is_file()
