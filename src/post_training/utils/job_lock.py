"""One process group per resume target: an exclusive lock taken before anything is cleaned or
written.

Two launches of the same job (a double ``sbatch``, a SLURM retry while the first attempt still
runs, a user re-running a command in a second terminal) would otherwise share a checkpoint dir:
the second one's clean-up of stale temporaries deletes the first one's checkpoint in progress.
The main process of a launch takes the lock (the other ranks of an ``accelerate launch`` rely on
it); a second launch exits at once with :data:`EXIT_CODE_LOCKED` and a line naming the holder.

Two mechanisms (``resuming.lock``):

* ``flock`` (default): ``flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.job.lock``. The kernel (or the NFS
  / Lustre lock manager) releases it when the holder dies, so kill -9 never leaves a stale lock.
* ``heartbeat``: for filesystems where ``flock`` is not supported or not shared between nodes
  (some NFS mounts): the lock file is created exclusively (``O_EXCL``) and its mtime refreshed
  every ``heartbeat_s``; it is stale (taken over) when its heartbeat is older than
  ``stale_after_s``, or at once when its holder is a dead process on this host. The holder
  removes it when it exits normally.
* ``none``: no lock (a filesystem where neither works; the user guarantees one launch).

The holder (host, pid, start time, command) is written into the lock file, for the message.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from post_training.errors import ConfigError, ProjectError

LOCK_FILE = ".job.lock"
LOCK_MODES = ("flock", "heartbeat", "none")
# 73 is EX_CANTCREAT from sysexits.h: the output (the job's checkpoint dir) cannot be taken.
# Distinct from 2 (a config or data error) and 75 (stopped by a signal: a successor resumes).
EXIT_CODE_LOCKED = 73
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class JobLocked(ProjectError):
    """Another launch of the same job holds its resume target."""

    exit_code = EXIT_CODE_LOCKED


@dataclass(frozen=True)
class LockSettings:
    mode: str = "flock"
    heartbeat_s: float = 30.0
    stale_after_s: float = 120.0


def _holder_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "argv": sys.argv,
    }


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict[str, Any]) -> str:
    if not record.get("pid"):
        return "a launch that has just taken it (no holder recorded yet)"
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return (
        f"host {record.get('host', '?')}, pid {record['pid']}{job}, "
        f"started {record.get('started', '?')}"
    )


class JobLock:
    """A held lock; released when the process exits (or by :meth:`release`)."""

    def __init__(self, path: Path, mode: str, fd: int | None = None) -> None:
        self.path, self.mode, self._fd = path, mode, fd
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def start_heartbeat(self, every_s: float) -> None:
        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._beat = threading.Thread(target=beat, name="job-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self.mode == "heartbeat" and _read_holder(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


_HELD: dict[Path, JobLock] = {}


def _locked_error(directory: Path, path: Path, record: dict[str, Any], extra: str = "") -> None:
    raise JobLocked(
        f"{directory} is in use by another launch of this job ({describe_holder(record)}"
        f"{extra}); lock {path}. Wait for it to end or stop it; this launch changed nothing"
    )


def _flock(directory: Path, path: Path) -> JobLock:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        _locked_error(directory, path, _read_holder(path))
    except OSError as error:
        os.close(fd)
        if error.errno in _UNSUPPORTED:
            raise ConfigError(
                f"resuming.lock=flock: flock is not supported on the filesystem of {directory} "
                f"({error.strerror}); set resuming.lock=heartbeat"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
    return JobLock(path, "flock", fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat(directory: Path, path: Path, settings: LockSettings) -> JobLock:
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            record = _read_holder(path)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            dead_here = (
                record.get("host") == socket.gethostname()
                and isinstance(record.get("pid"), int)
                and not pid_alive(record["pid"])
            )
            if age <= settings.stale_after_s and not dead_here:
                _locked_error(directory, path, record, f", last heartbeat {age:.0f} s ago")
            path.unlink(missing_ok=True)  # stale: its holder died without releasing it
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(_holder_record()) + "\n")
        lock = JobLock(path, "heartbeat")
        lock.start_heartbeat(settings.heartbeat_s)
        return lock
    _locked_error(directory, path, _read_holder(path))
    raise AssertionError("unreachable")


def acquire(
    directory: str | Path, settings: LockSettings = LockSettings(), name: str = LOCK_FILE
) -> JobLock | None:
    """Take the job lock ``directory/name`` (the directory is created if needed) for the rest of
    this process; raises :class:`JobLocked` when another launch holds it. Idempotent within a
    process; None with ``mode='none'``."""
    if settings.mode not in LOCK_MODES:
        raise ConfigError(f"resuming.lock={settings.mode!r}: must be one of {LOCK_MODES}")
    if settings.mode == "none":
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    key = path.resolve()
    if key in _HELD:
        return _HELD[key]
    if settings.mode == "flock":
        lock = _flock(directory, path)
    else:
        lock = _heartbeat(directory, path, settings)
    _HELD[key] = lock
    atexit.register(lock.release)
    return lock


def release_all() -> None:
    """Release every lock this process holds (for in-process runs and tests)."""
    while _HELD:
        _HELD.popitem()[1].release()
