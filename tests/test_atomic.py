"""utils.atomic: files and directories are complete or absent (temporary sibling, then rename)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from post_training.utils.atomic import (
    atomic_dir,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    publish,
    temporary_sibling,
)


def test_temporary_sibling_names() -> None:
    target = Path("/x/y/cache.npz")
    unique = temporary_sibling(target)
    assert unique.parent == target.parent and unique.name.startswith(".tmp-")
    assert unique.name.endswith("-cache.npz") and unique != temporary_sibling(target)
    assert temporary_sibling(Path("/r/checkpoint-7"), unique=False) == Path("/r/.tmp-checkpoint-7")


def test_write_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "new" / "a.txt"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    atomic_write_json(tmp_path / "b.json", {"k": [1, 2]})
    assert (tmp_path / "b.json").read_text() == json.dumps({"k": [1, 2]}, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "new"]


def test_atomic_file_keeps_the_suffix_and_drops_a_failed_write(tmp_path: Path) -> None:
    path = tmp_path / "logps.npz"
    with atomic_file(path) as tmp:
        np.savez(tmp, x=np.arange(3))  # np.savez would append .npz to a name without it
    with np.load(path) as arrays:
        assert arrays["x"].tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["logps.npz"]


def test_atomic_dir_publishes_replaces_and_aborts(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "f").write_text("1")
        assert not target.exists()  # nothing visible before the block completes
    assert (target / "f").read_text() == "1"

    with atomic_dir(target) as tmp:  # replaces the whole directory
        (tmp / "g").write_text("2")
    assert [p.name for p in target.iterdir()] == ["g"]

    with pytest.raises(ValueError, match="last check"), atomic_dir(target) as tmp:
        (tmp / "h").write_text("3")
        raise ValueError("last check")
    assert [p.name for p in target.iterdir()] == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left


def test_atomic_dir_keep_or_refuse_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    target.mkdir()
    (target / "first").write_text("")
    with atomic_dir(target, if_exists="keep") as tmp:
        (tmp / "second").write_text("")
    assert [p.name for p in target.iterdir()] == ["first"]
    with pytest.raises(FileExistsError), atomic_dir(target, if_exists="error") as tmp:
        (tmp / "second").write_text("")
    assert [p.name for p in target.iterdir()] == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_publish_a_shared_temporary(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-3"
    tmp = temporary_sibling(final, unique=False)
    tmp.mkdir()
    (tmp / "state").write_text("s")
    assert publish(tmp, final, fsync=True)
    assert (final / "state").read_text() == "s" and not tmp.exists()
    with pytest.raises(ValueError, match="if_exists"):
        publish(tmp, final, if_exists="overwrite")
