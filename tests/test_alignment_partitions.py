"""Partitioned stage outputs: slices cover every row once, complete-or-absent writes, skip on
re-run, refusal of mixed configs, and assembly checks (missing, duplicated, mismatched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from post_training.data_alignment.merge_partitions import merge
from post_training.data_alignment.partitions import (
    MERGED_DIR,
    Partition,
    StageOutput,
    assemble,
    read_stage,
)
from post_training.errors import ConfigError, DataError


def _write(out_dir: Path, index: int, count: int, rows: list[dict], digest: str = "h1") -> Path:
    output = StageOutput(out_dir, "stage", Partition(index, count), digest)
    output.check_siblings()
    assert not output.is_complete()
    return output.write(rows, settings={}, inputs=[], report={}, started=0.0)


@pytest.mark.parametrize("total", [0, 1, 5, 7, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_partitions_cover_every_row_once(total: int, count: int) -> None:
    rows = list(range(total))
    parts = [Partition(i, count).select(rows) for i in range(count)]
    assert [r for part in parts for r in part] == rows
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_partition_settings_are_refused() -> None:
    for index, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ConfigError, match="0 <= index < count"):
            Partition(index, count)
    with pytest.raises(ConfigError, match="integer"):
        Partition("1", 2)  # type: ignore[arg-type]


def test_write_skip_and_refuse_other_configs(tmp_path: Path) -> None:
    rows = [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
    path = _write(tmp_path, 0, 2, rows)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["config_hash"] == "h1"
    assert manifest["partition"] == {"index": 0, "count": 2} and "finished" in manifest
    assert not list(tmp_path.glob(".tmp-*"))  # written to a temporary dir, then renamed
    # Same config: complete, skipped.
    assert StageOutput(tmp_path, "stage", Partition(0, 2), "h1").is_complete()
    # Another config for the same partition: refused, unless overwrite.
    with pytest.raises(ConfigError, match="overwrite=true"):
        StageOutput(tmp_path, "stage", Partition(0, 2), "h2").is_complete()
    assert not StageOutput(tmp_path, "stage", Partition(0, 2), "h2", overwrite=True).is_complete()
    # Another partition of another config, or of another count, in the same dir: refused.
    with pytest.raises(ConfigError, match="differing configs"):
        StageOutput(tmp_path, "stage", Partition(1, 2), "h2").check_siblings()
    with pytest.raises(ConfigError, match="differing configs"):
        StageOutput(tmp_path, "stage", Partition(0, 3), "h1").check_siblings()


def test_an_interrupted_partition_is_redone(tmp_path: Path) -> None:
    stray = tmp_path / Partition(0, 1).name
    stray.mkdir()
    (stray / "rows.jsonl").write_text('{"id": "half"}\n')  # no manifest: never completed
    output = StageOutput(tmp_path, "stage", Partition(0, 1), "h1")
    assert not output.is_complete() and not stray.exists()


def test_assemble_and_merge(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    _write(stage, 1, 2, [{"id": "c"}])
    with pytest.raises(DataError, match=r"partitions \[0\] of 2 are missing"):
        assemble(stage)
    _write(stage, 0, 2, [{"id": "a"}, {"id": "b"}])
    rows, manifests = assemble(stage)
    assert [r["id"] for r in rows] == ["a", "b", "c"] and len(manifests) == 2
    assert read_stage(stage).rows == rows  # partitions read directly, in order

    merged = merge(stage)
    assert merged == stage / MERGED_DIR
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["rows"] == 3 and manifest["config_hash"] == "h1"
    assert [p["rows"] for p in manifest["partitions"]] == [2, 1]
    assert read_stage(stage).source["path"] == str(merged)
    mtime = (merged / "rows.jsonl").stat().st_mtime_ns
    assert merge(stage) == merged and (merged / "rows.jsonl").stat().st_mtime_ns == mtime

    # Partition 1 redone with another config: the merged output is stale, and so is the mix.
    StageOutput(stage, "stage", Partition(1, 2), "h2", overwrite=True).write(
        [{"id": "c"}], settings={}, inputs=[], report={}, started=0.0
    )
    with pytest.raises(DataError, match="stale"):
        read_stage(stage)
    with pytest.raises(DataError, match="differing configs"):
        assemble(stage)


def test_duplicated_rows_and_mixed_counts_are_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup"
    _write(dup, 0, 2, [{"id": "a"}])
    _write(dup, 1, 2, [{"id": "a"}])
    with pytest.raises(
        DataError, match="'a' is in partition-00000-of-00002 and in partition-00001"
    ):
        assemble(dup)

    mixed = tmp_path / "mixed"
    _write(mixed, 0, 1, [{"id": "a"}])
    StageOutput(mixed, "stage", Partition(1, 2), "h1", overwrite=True).write(
        [{"id": "b"}], settings={}, inputs=[], report={}, started=0.0
    )
    with pytest.raises(DataError, match="differing counts"):
        assemble(mixed)


def test_read_stage_errors_name_the_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or stage directory"):
        read_stage(tmp_path / "nowhere", "input")
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: invalid JSON"):
        read_stage(bad)
    bad.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"rows.jsonl:2: not UTF-8 text \(byte 0xe9 at column 12"):
        read_stage(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no complete partition"):
        read_stage(tmp_path / "empty")
