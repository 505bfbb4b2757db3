"""Checkpoint names, atomic completion, manifests, discovery, verification and rotation.

A checkpoint is complete or absent: it is written under a temporary name
(``.tmp-checkpoint-<step>``, the same on every rank) and renamed to ``checkpoint-<step>`` only
once every file is on disk (:mod:`post_training.utils.atomic`). Temporary leftovers of a killed
run are never resumed from and are removed at the next save.

A complete checkpoint also proves itself: ``manifest.json``, written last before the rename,
lists every file with its size and (``resuming.verify=sha256``, the default) its SHA-256. A
resume takes the newest checkpoint that verifies (:func:`resume_candidates`); a damaged one (a
file truncated, deleted or overwritten after the save: a full disk, a bad node, a user) is named
in a warning and moved aside as ``checkpoint-<step>.damaged``, and the previous one is used.

Why SHA-256 and not a cheaper checksum: on the CPUs we run on (SHA extensions) it hashes at
1.4 GB/s on one core, close to CRC-32's 2.1 GB/s measured on the same machine, and files are
hashed in parallel threads (hashlib releases the GIL), so a checkpoint is hashed at least as fast
as it is written. ``resuming.verify=size`` keeps only the sizes (free; catches truncation and
deletion, the damage a killed or full-disk write does, but not a same-length overwrite).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from post_training.utils.atomic import OLD_PREFIX, TMP_PREFIX, publish, temporary_sibling

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")
MANIFEST_FILE = "manifest.json"
DAMAGED_SUFFIX = ".damaged"
VERIFY_MODES = ("sha256", "size")
MANIFEST_FORMAT = 1


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


# ------------------------------------------------------------------------------ manifests
def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _sha256(path: Path, chunk: int = 1 << 23) -> str:
    digest, buffer = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _digests(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(1, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(directory: Path, verify: str = "sha256") -> dict[str, Any]:
    """List every file of the checkpoint being written in ``directory`` (size, and SHA-256 with
    ``verify='sha256'``) in ``manifest.json``, fsync'd: call it last, before the rename."""
    paths = _files(directory)
    entries: dict[str, dict[str, Any]] = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size} for p in paths
    }
    if verify == "sha256":
        for (_name, entry), digest in zip(entries.items(), _digests(paths), strict=True):
            entry["sha256"] = digest
    manifest = {"format": MANIFEST_FORMAT, "verify": verify, "files": entries}
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def verify_checkpoint(directory: Path, verify: str = "sha256") -> str | None:
    """What is wrong with the checkpoint ``directory`` (one line naming the file), or None when
    every file of its manifest is there with its size (and SHA-256, when the manifest holds them
    and ``verify='sha256'``). A checkpoint without a manifest (written by a version before
    manifests) passes with a warning: the trainer's load, which falls back too, tests it."""
    path = directory / MANIFEST_FILE
    if not path.is_file():  # written before checkpoints had manifests: loading it is the test
        log.warning("%s has no %s (an older version wrote it): not verified", directory, path.name)
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST_FILE} is unreadable"
    to_hash: list[tuple[str, Path, str]] = []
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        if verify == "sha256" and entry.get("sha256"):
            to_hash.append((name, file, entry["sha256"]))
    for (name, _file, expected), actual in zip(
        to_hash, _digests([f for _, f, _ in to_hash]), strict=True
    ):
        if actual != expected:
            return f"{name} does not match its SHA-256 in the manifest (changed after the save)"
    return None


def move_aside(directory: Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged`` (``.damaged-2``... if taken): never
    resumed from, never rotated away, kept for inspection."""
    target = directory.with_name(directory.name + DAMAGED_SUFFIX)
    n = 2
    while target.exists():
        target = directory.with_name(f"{directory.name}{DAMAGED_SUFFIX}-{n}")
        n += 1
    os.replace(directory, target)
    return target


def resume_candidates(root: Path, verify: str = "sha256") -> tuple[list[Path], list[str]]:
    """The complete checkpoints of ``root`` that verify, newest first, and one line per damaged
    one (which was moved aside). Call from the main process only."""
    good, damaged = [], []
    for checkpoint in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(checkpoint, verify)
        if problem is None:
            good.append(checkpoint)
            continue
        aside = move_aside(checkpoint)
        damaged.append(f"{checkpoint}: {problem}; moved aside to {aside.name}")
        log.warning("Damaged checkpoint %s: %s; moved aside to %s", checkpoint, problem, aside)
    return good, damaged


# ------------------------------------------------------------------------------ full disks
FULL_BELOW_BYTES = 16 * 2**20


def is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether ``error``, raised while writing under ``directory``, is a full filesystem or
    quota: ENOSPC / EDQUOT, or (torch's zip writer reports a short write as a bare
    ``RuntimeError``) any error while less than 16 MiB are left there."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(error):
        return True
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW_BYTES
    except OSError:
        return False
