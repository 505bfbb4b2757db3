"""Saving built datasets (the ``build_mixture`` / ``build_split`` entrypoints): refuse or replace
an existing output, write a ``DatasetDict`` plus ``manifest.json`` atomically, and print what was
selected (rows per source, per stratum)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from post_training.data_sft.splitting import count_by
from post_training.errors import ConfigError
from post_training.utils.atomic import atomic_dir
from post_training.utils.config import config_hash

MANIFEST = "manifest.json"


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``output_dir`` unless ``overwrite``; never replace a directory that is
    not a saved dataset (no ``dataset_dict.json`` / ``manifest.json``)."""
    if not output_dir.exists():
        return
    if not overwrite:
        raise ConfigError(
            f"{output_dir} already exists; refusing to overwrite it (nothing was written). "
            "Pass overwrite=true to replace it, or choose another name."
        )
    if not any((output_dir / f).is_file() for f in ("dataset_dict.json", MANIFEST)):
        raise ConfigError(f"{output_dir} exists and is not a saved dataset; not replacing it")


def save_splits(
    splits: Mapping[str, Dataset], output_dir: Path, manifest: Mapping[str, Any], overwrite: bool
) -> Path:
    """Save ``splits`` as a ``DatasetDict`` plus ``manifest.json`` into ``output_dir``: written to
    a temporary sibling, then renamed into place, so the directory is complete or absent."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    with atomic_dir(output_dir) as tmp:
        DatasetDict(dict(splits)).save_to_disk(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        check_output_dir(output_dir, overwrite)  # another process may have written it meanwhile
    return output_dir


def build_manifest(
    resolved: Mapping[str, Any],
    sources: Mapping[str, Any],
    splits: Mapping[str, Dataset],
    **extra: Any,
) -> dict[str, Any]:
    """What a saved dataset is made of: sources (fingerprints, counts), split sizes, seed,
    config hash (of the resolved config minus paths and run-specific keys), time, config."""
    ignore = [*resolved.get("resuming", {}).get("ignore_keys", []), "output_dir", "overwrite"]
    return {
        "name": resolved.get("name"),
        "entrypoint": resolved.get("entrypoint"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash(resolved, ignore),
        "seed": resolved.get("seed"),
        "sources": dict(sources),
        "splits": {name: len(ds) for name, ds in splits.items()},
        **extra,
        "config": dict(resolved),
    }


def format_sources(sources: Mapping[str, Mapping[str, Any]]) -> str:
    """Table of selected / available rows per source."""
    width = max([len(n) for n in sources] + [6])
    lines = [f"{'source':<{width}}  {'selected':>9}  {'available':>9}"]
    for name, info in sources.items():
        lines.append(f"{name:<{width}}  {info['selected']:>9}  {info['available']:>9}")
    return "\n".join(lines)


def strata_counts(splits: Mapping[str, Dataset], column: str) -> dict[str, dict[str, int]]:
    """Rows per value of ``column`` in each split: ``{value: {split: rows}}``."""
    per_split = {name: count_by(ds, column) for name, ds in splits.items()}
    values = sorted({v for counts in per_split.values() for v in counts})
    return {v: {name: per_split[name].get(v, 0) for name in splits} for v in values}


def format_strata(counts: Mapping[str, Mapping[str, int]], column: str) -> str:
    """Table of rows per stratum and split."""
    names = list(next(iter(counts.values()), {}))
    width = max([len(v) for v in counts] + [len(column)])
    lines = [f"{column:<{width}}" + "".join(f"  {n:>8}" for n in names)]
    for value, row in counts.items():
        lines.append(f"{value:<{width}}" + "".join(f"  {row[n]:>8}" for n in names))
    return "\n".join(lines)
