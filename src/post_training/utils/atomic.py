"""Files and directories that are complete or absent: write a temporary sibling, rename it when
complete.

A reader (a resumed run, a later stage, another job sharing a cache) never sees half a file or
half a directory: everything is written under a ``.tmp-`` name next to the target, in the same
directory (so the rename stays within one filesystem and is atomic), and renamed onto the target
only once fully written. An existing target directory is moved aside first and removed only after
the new one is in place.

* :func:`atomic_write_text`, :func:`atomic_write_json`: one small file;
* :func:`atomic_file`: a temporary path for a writer that wants a file name (``np.savez``);
* :func:`atomic_dir`: a temporary directory to fill, published on leaving the block (dropped if
  the block raises);
* :func:`temporary_sibling`, :func:`publish`: the two halves, for writers that cannot hold a
  ``with`` block (all ranks of a multi-process checkpoint write the temporary, one publishes).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
IF_EXISTS = ("replace", "keep", "error")


def _unique_tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_sibling(path: str | Path, unique: bool = True) -> Path:
    """Where to write ``path`` before publishing it: ``.tmp-<pid>-<random>-<name>`` next to it,
    or, with ``unique=False``, ``.tmp-<name>`` (the same for every process, e.g. every rank of a
    launch). The name keeps ``path``'s suffix (``np.savez`` appends ``.npz`` otherwise)."""
    path = Path(path)
    tag = f"{_unique_tag()}-" if unique else ""
    return path.parent / f"{TMP_PREFIX}{tag}{path.name}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    tmp: str | Path, final: str | Path, *, if_exists: str = "replace", fsync: bool = False
) -> bool:
    """Rename the complete ``tmp`` (file or directory) to ``final``; returns whether it did.

    ``if_exists`` says what happens to an existing ``final``: ``replace`` it (a file atomically,
    a directory by moving it aside to ``.old-<name>-...``, renaming, then removing the old one);
    ``keep`` it (another process published the same content first: ``tmp`` is removed, returns
    False); or ``error`` (``FileExistsError``, ``tmp`` left for the caller's cleanup). ``fsync``
    makes the rename durable (fsync of the parent directory)."""
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    tmp, final = Path(tmp), Path(final)
    if final.exists() and if_exists != "replace":
        if if_exists == "error":
            raise FileExistsError(f"{final} already exists")
        _remove(tmp)
        return False
    aside = None
    if final.is_dir() and not final.is_symlink():
        aside = final.parent / f"{OLD_PREFIX}{final.name}-{_unique_tag()}"
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        elif if_exists == "keep" and final.exists():  # published by another process meanwhile
            _remove(tmp)
            return False
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if fsync:
        _fsync_dir(final.parent)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary file path to write ``path`` to; renamed onto ``path`` when the block ends,
    removed if it raises. The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        publish(tmp, path, fsync=fsync)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(
    path: str | Path, text: str, encoding: str = "utf-8", newline: str | None = None
) -> None:
    """Write ``text`` to ``path`` through a temporary sibling (complete or absent)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding=encoding, newline=newline) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps: Any) -> None:
    """``json.dumps(obj, indent=indent, **dumps)`` plus a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


@contextmanager
def atomic_dir(
    final: str | Path,
    *,
    unique: bool = True,
    if_exists: str = "replace",
    fsync: bool = False,
) -> Iterator[Path]:
    """A fresh, empty temporary directory next to ``final`` to fill; published as ``final`` when
    the block ends (see :func:`publish` for ``if_exists`` and ``fsync``), removed if the block
    (or the publishing) raises: raising inside the block (a last check) writes nothing. The
    parent directory is created; ``unique`` as in :func:`temporary_sibling`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final, unique=unique)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final, if_exists=if_exists, fsync=fsync)
    finally:
        _remove(tmp)
