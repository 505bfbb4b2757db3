"""Partitioned, resumable outputs of the alignment data stages.

A stage writes to its ``output_dir``::

    <output_dir>/partition-00001-of-00004/rows.jsonl      one JSON row per line
    <output_dir>/partition-00001-of-00004/manifest.json   written last: its presence = complete
    <output_dir>/merged/{rows.jsonl, manifest.json}       merge_partitions

A partition is written to a temporary sibling directory and renamed into place, so it is either
complete or absent. Re-running a partition that is complete with the same config hash skips it;
with another hash it is refused (unless ``overwrite``), since partitions of differing configs
must never be mixed. Reading a stage directory assembles its partitions in order and checks that
none is missing, that they share one partition count and one config hash, and that no row ``id``
appears twice. Every manifest records the inputs, the config hash, the row count and the time.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from post_training.data_sft.file_formats import parse_jsonl
from post_training.errors import ConfigError, DataError
from post_training.utils.atomic import TMP_PREFIX, atomic_dir
from post_training.utils.failpoints import failpoint

log = logging.getLogger(__name__)

ROWS_FILE = "rows.jsonl"
MANIFEST_FILE = "manifest.json"
MERGED_DIR = "merged"
_PARTITION_RE = re.compile(r"^partition-(\d{5})-of-(\d{5})$")


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count``: a contiguous slice of the input rows."""

    index: int
    count: int

    def __post_init__(self) -> None:
        for name in ("index", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"partition.{name} must be an integer, got {value!r}")
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(
                f"partition.index={self.index}, partition.count={self.count}: need "
                "0 <= index < count"
            )

    @property
    def name(self) -> str:
        return f"partition-{self.index:05d}-of-{self.count:05d}"

    def bounds(self, total: int) -> tuple[int, int]:
        """``[start, stop)`` of this partition among ``total`` rows (sizes differ by at most 1)."""
        return total * self.index // self.count, total * (self.index + 1) // self.count

    def select(self, rows: Sequence[Any]) -> list[Any]:
        start, stop = self.bounds(len(rows))
        return list(rows[start:stop])


def partition_from_config(config: Mapping[str, Any]) -> Partition:
    part = config.get("partition") or {}
    index = part.get("index")
    if index is None:
        raise ConfigError("partition.index is not set (0 for an unpartitioned run)")
    return Partition(index, part.get("count", 1))


# --- Reading and writing one directory ----------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (a partition's, or a stage's input): the SFT reader's exact
    line-by-line path, so a malformed line or bytes that are not UTF-8 name the 1-based line."""
    return parse_jsonl(Path(path))[0]


def versions() -> dict[str, str]:
    out = {}
    for package in ("post-training", "torch", "transformers"):
        try:
            out[package] = version(package)
        except Exception:
            out[package] = "unknown"
    return out


def write_rows(
    directory: Path, rows: Iterable[Mapping[str, Any]], manifest: Mapping[str, Any]
) -> None:
    """Write ``rows.jsonl`` then ``manifest.json`` into a temporary sibling and rename it to
    ``directory`` (which must not exist: the caller decides about overwriting)."""
    with atomic_dir(directory, if_exists="error") as tmp:
        count = 0
        with open(tmp / ROWS_FILE, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        failpoint("partition-rows-written")
        full = {**manifest, "rows": count, "versions": versions()}
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")


def remove_partition_temporaries(output_dir: Path, name: str) -> int:
    """Remove the temporaries a killed write of partition ``name`` left in ``output_dir``
    (``.tmp-<pid>-<tag>-<name>``; the caller holds the partition's lock); how many."""
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX)}\d+-[0-9a-f]{{8}}-{re.escape(name)}$")
    if not output_dir.is_dir():
        return 0
    stale = [p for p in output_dir.iterdir() if pattern.match(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def replace_dir(directory: Path, overwrite: bool, what: str) -> None:
    """Make room for a new ``directory``: refuse unless ``overwrite`` (then remove it)."""
    if not directory.exists():
        return
    if not overwrite:
        raise ConfigError(f"{what} {directory} exists; set overwrite=true to replace it")
    ours = read_manifest(directory) is not None or (directory / ROWS_FILE).is_file()
    if not ours and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not a stage output; refusing to remove it")
    shutil.rmtree(directory)


# --- One stage's partitions -------------------------------------------------------------------


@dataclass
class StageOutput:
    """Where one run of a stage writes its partition, and whether it is done already."""

    output_dir: Path
    stage: str
    partition: Partition
    config_hash: str
    overwrite: bool = False

    @property
    def path(self) -> Path:
        return self.output_dir / self.partition.name

    def check_siblings(self) -> None:
        """Refuse partitions of another count or config hash in the same output dir."""
        for name, manifest in complete_partitions(self.output_dir).items():
            index, count = _parse(name)
            if index == self.partition.index and count == self.partition.count:
                continue
            if count != self.partition.count or manifest.get("config_hash") != self.config_hash:
                if self.overwrite:
                    continue
                raise ConfigError(
                    f"{self.output_dir} holds {name} (config {manifest.get('config_hash')}) "
                    f"while this run is {self.partition.name} (config {self.config_hash}): "
                    "partitions of differing configs are never mixed. Use another output_dir, "
                    "or overwrite=true to replace the partitions one by one."
                )

    def is_complete(self) -> bool:
        """True when this partition exists with the same config (then the run skips it)."""
        manifest = read_manifest(self.path)
        if manifest is None:
            if self.path.exists():  # an interrupted write never renames; clear a stray dir
                shutil.rmtree(self.path)
            return False
        if manifest.get("config_hash") == self.config_hash and not self.overwrite:
            return True
        if not self.overwrite:
            raise ConfigError(
                f"{self.path} is complete with config {manifest.get('config_hash')}, not this "
                f"run's {self.config_hash}; set overwrite=true to replace it, or use another "
                "output_dir"
            )
        return False

    def write(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        settings: Mapping[str, Any],
        inputs: Sequence[Mapping[str, Any]],
        report: Mapping[str, Any],
        started: float,
    ) -> Path:
        replace_dir(self.path, self.overwrite, "partition")
        write_rows(
            self.path,
            rows,
            {
                "stage": self.stage,
                "partition": {"index": self.partition.index, "count": self.partition.count},
                "config_hash": self.config_hash,
                "settings": settings,
                "inputs": list(inputs),
                "report": report,
                "started": iso_time(started),
                "finished": iso_time(time.time()),
                "seconds": round(time.time() - started, 3),
            },
        )
        log.info(
            "%s: %s written (%d rows) to %s", self.stage, self.partition.name, len(rows), self.path
        )
        return self.path


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def _parse(name: str) -> tuple[int, int]:
    match = _PARTITION_RE.match(name)
    assert match is not None
    return int(match.group(1)), int(match.group(2))


def complete_partitions(output_dir: Path) -> dict[str, dict[str, Any]]:
    """Manifests of the complete partitions in ``output_dir``, by directory name."""
    out = {}
    if Path(output_dir).is_dir():
        for path in sorted(Path(output_dir).iterdir()):
            if _PARTITION_RE.match(path.name) and path.is_dir():
                manifest = read_manifest(path)
                if manifest is not None:
                    out[path.name] = manifest
    return out


@dataclass(frozen=True)
class StageRows:
    """Rows read from a stage output (or a plain JSONL file) and what they came from."""

    rows: list[dict[str, Any]]
    source: dict[str, Any]  # path, config_hash (stage outputs) or size + mtime (files), rows


def assemble(output_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All partitions of a stage dir, in order, checked; returns (rows, their manifests)."""
    output_dir = Path(output_dir)
    found = complete_partitions(output_dir)
    if not found:
        stray = (
            sorted(p.name for p in output_dir.glob("partition-*")) if output_dir.is_dir() else []
        )
        detail = f" (incomplete: {stray})" if stray else ""
        raise DataError(f"{output_dir}: no complete partition{detail}; run the stage first")
    counts = {name: _parse(name)[1] for name in found}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{output_dir}: partitions of differing counts {sorted(found)}: partitions of "
            "differing configs are never mixed; remove the stale ones"
        )
    hashes: dict[str, list[str]] = {}
    for name, manifest in found.items():
        hashes.setdefault(str(manifest.get("config_hash")), []).append(name)
    if len(hashes) > 1:
        raise DataError(
            f"{output_dir}: partitions of differing configs (config hash -> partitions): "
            f"{hashes}; re-run the stale ones with overwrite=true"
        )
    count = next(iter(counts.values()))
    present = {_parse(name)[0] for name in found}
    missing = sorted(set(range(count)) - present)
    if missing:
        raise DataError(
            f"{output_dir}: partitions {missing} of {count} are missing or incomplete; run the "
            f"stage with partition.count={count} and partition.index in {missing}"
        )
    rows: list[dict[str, Any]] = []
    manifests = []
    seen: dict[str, str] = {}
    for name in sorted(found):
        part_rows = read_jsonl(output_dir / name / ROWS_FILE)
        expected = found[name].get("rows")
        if expected is not None and expected != len(part_rows):
            raise DataError(
                f"{output_dir / name}: {len(part_rows)} rows but the manifest says {expected}"
            )
        for number, row in enumerate(part_rows, start=1):
            key = row.get("id")
            if key is None:
                raise DataError(f"{output_dir / name / ROWS_FILE}: line {number}: no 'id'")
            if key in seen:
                raise DataError(
                    f"{output_dir}: row id {key!r} is in {seen[key]} and in {name} (duplicated)"
                )
            seen[key] = name
        rows.extend(part_rows)
        manifests.append(found[name])
    return rows, manifests


def read_stage(path: str | Path, where: str = "input") -> StageRows:
    """Rows of a stage dir (its ``merged/`` if present, else its partitions assembled), of one
    partition or merged dir, or of a JSONL file."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        rows = read_jsonl(path)
        return StageRows(rows, {"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime_ns})
    if not path.is_dir():
        raise ConfigError(f"{where} {path}: no such file or stage directory")
    for directory in (path, path / MERGED_DIR):
        manifest = read_manifest(directory)
        if manifest is not None:
            stale = sorted(
                name
                for name, m in complete_partitions(path).items()
                if m.get("config_hash") != manifest["config_hash"]
            )
            if stale:
                raise DataError(
                    f"{directory} is stale: {stale} hold another config; run merge_partitions "
                    "again with overwrite=true"
                )
            rows = read_jsonl(directory / ROWS_FILE)
            return StageRows(
                rows,
                {"path": str(directory), "config_hash": manifest["config_hash"], "rows": len(rows)},
            )
    rows, manifests = assemble(path)
    return StageRows(
        rows, {"path": str(path), "config_hash": manifests[0]["config_hash"], "rows": len(rows)}
    )
