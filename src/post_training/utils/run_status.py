"""``status.json`` of a run dir: what became of the run, for a person listing run dirs.

Written by the main process only, atomically (a reader never sees half a file)::

    {"state": "running" | "completed" | "failed" | "stopped",
     "exit_code": null | int, "error": null | "<the one line printed>",
     "started": "2026-12-02T08:00:00+00:00", "updated": ..., "ended": null | ...,
     "duration_s": null | float, "last_step": null | int,
     "entrypoint": "train_sft", "pid": 1234, "host": "node-1", "resumed_from": null | path}

``stopped`` is a run stopped by a signal after its checkpoint (exit 75: a re-run resumes it).
A run killed outright (``kill -9``, OOM killer, node failure) cannot write its end: it stays
``running``, and :func:`read` reports it as ``died`` when its pid is gone on this host.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from post_training.utils.atomic import atomic_write_json
from post_training.utils.job_lock import pid_alive
from post_training.utils.signals import EXIT_CODE_STOPPED

STATUS_FILE = "status.json"
UPDATE_EVERY_S = 5.0  # last_step updates are written at most this often

_current: _Status | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Status:
    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        self.written = 0.0
        self.started = time.time()

    def write(self) -> None:
        self.record["updated"] = _now()
        atomic_write_json(self.path, self.record)
        self.written = time.time()


def start(run_dir: Path, entrypoint: str, resumed_from: Path | None = None) -> None:
    """Mark ``run_dir`` as running (this process's run from now on)."""
    global _current
    record = {
        "state": "running",
        "exit_code": None,
        "error": None,
        "started": _now(),
        "updated": None,
        "ended": None,
        "duration_s": None,
        "last_step": None,
        "entrypoint": entrypoint,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
    _current = _Status(Path(run_dir) / STATUS_FILE, record)
    _current.write()


def update(**fields: Any) -> None:
    """Record ``fields`` (e.g. ``last_step``); written at most every few seconds."""
    if _current is None:
        return
    _current.record.update(fields)
    if time.time() - _current.written >= UPDATE_EVERY_S:
        _current.write()


def active() -> bool:
    """Whether this process started a run (:func:`start`) that has not finished."""
    return _current is not None


def mark_launch(directory: Path, entrypoint: str | None, exit_code: int, error: str | None) -> None:
    """The status of a launch that ended before it started a run (a config or data error found
    first, a locked job, or an entrypoint without a run of its own): its Hydra dir, which holds
    the log, says so too, so that a failed launch never looks like a run."""
    start(directory, entrypoint or "?")
    finish(exit_code, error)


def finish(exit_code: int, error: str | None = None) -> None:
    """The end of the current run: completed (0), stopped (75) or failed, with its error line."""
    global _current
    if _current is None:
        return
    if exit_code == 0:
        state = "completed"
    elif exit_code == EXIT_CODE_STOPPED:
        state = "stopped"
    else:
        state = "failed"
    _current.record.update(
        state=state,
        exit_code=exit_code,
        error=error,
        ended=_now(),
        duration_s=round(time.time() - _current.started, 1),
    )
    with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
        _current.write()
    _current = None


def read(run_dir: Path) -> dict[str, Any] | None:
    """The status of ``run_dir`` (None when it has none); a ``running`` run whose process is
    gone on this host reads as ``died``."""
    import json

    path = Path(run_dir) / STATUS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and died(record):
        record["state"] = "died"
    return record


def died(record: dict[str, Any]) -> bool:
    """A ``running`` record whose process is gone on this host (killed outright)."""
    return (
        record.get("state") == "running"
        and record.get("host") == socket.gethostname()
        and isinstance(record.get("pid"), int)
        and not pid_alive(record["pid"])
    )
