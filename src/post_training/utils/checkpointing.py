"""Checkpoint names, atomic completion, discovery and rotation.

A checkpoint is complete or absent: it is written under a temporary name
(``.tmp-checkpoint-<step>``, the same on every rank) and renamed to ``checkpoint-<step>`` only
once every file is on disk (:mod:`post_training.utils.atomic`). Temporary leftovers of a killed
run are never resumed from and are removed at the next save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from post_training.utils.atomic import OLD_PREFIX, TMP_PREFIX, publish, temporary_sibling

PREFIX = "checkpoint-"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step}"


def temporary_path(final: Path) -> Path:
    """``.tmp-<name>``: one name for every rank of a launch (each computes it)."""
    return temporary_sibling(final, unique=False)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def step_of(checkpoint: Path) -> int:
    match = _STEP.match(checkpoint.name)
    if match is None:
        raise ValueError(f"Not a checkpoint dir: {checkpoint}")
    return int(match.group(1))


def remove_stale_temporaries(root: Path) -> None:
    """Remove what a killed save left: temporaries, and directories moved aside to be replaced."""
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        for p in root.glob(f"{prefix}*"):
            shutil.rmtree(p, ignore_errors=True)


def finalize(tmp: Path, final: Path) -> None:
    """Atomically publish a fully written checkpoint (fsync'd rename within one filesystem)."""
    publish(tmp, final, fsync=True)


def rotate(root: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints (None or <= 0 keeps all)."""
    if not keep or keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
