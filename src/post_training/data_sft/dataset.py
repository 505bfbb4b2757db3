"""Train / eval datasets of a ``dataset/*.yaml`` config, and saving built datasets atomically.

Dataset config schema (``train`` and ``eval`` are source or mixture specs)::

    name: tiny-tasks
    train: {path: ..., transform: messages, keep_columns: [answer, task]}  # or {sources: [...]}
    eval: {path: ..., transform: messages}     # or null, or
    # eval: {from_train: {size: 200 | fraction: 0.05, stratify_by: task, seed: 0}}
    answer_field: answer
    task_field: task
    max_train_examples: null                   # first N rows, after any from_train split
    max_eval_examples: null

The older schema (``train_path`` / ``eval_path`` / ``messages_field``) is read as single JSON-lines
sources with the ``messages`` transform, keeping ``answer_field`` and ``task_field``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from post_training.data_sft.mixture import load_dataset_split, parse_spec
from post_training.data_sft.sources import plain
from post_training.data_sft.split import count_by, split_dataset
from post_training.errors import ConfigError
from post_training.utils.atomic import atomic_dir
from post_training.utils.config import config_hash

MANIFEST = "manifest.json"
FROM_TRAIN_KEYS = ("size", "fraction", "stratify_by", "seed")


def dataset_specs(dataset_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(train spec, eval spec or None)`` of a dataset config, old schema included."""
    cfg = plain(dataset_cfg)
    if cfg.get("train") is not None:
        return cfg["train"], cfg.get("eval")
    if not cfg.get("train_path"):
        raise ConfigError("dataset: set 'train' to a source or mixture spec")
    keep = [f for f in (cfg.get("answer_field"), cfg.get("task_field")) if f]

    def legacy(path: str) -> dict[str, Any]:
        field = cfg.get("messages_field") or "messages"
        return {
            "path": f"jsonl:{path}",
            "transform": "messages",
            "transform_args": {"field": field},
            "keep_columns": keep,
        }

    return legacy(cfg["train_path"]), legacy(cfg["eval_path"]) if cfg.get("eval_path") else None


def _head(ds: Dataset, limit: int | None) -> Dataset:
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def load_train_eval(
    dataset_cfg: Mapping[str, Any],
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Canonical train and eval datasets of a dataset config, and a report (rows and sources per
    split; for ``from_train``, the split options)."""
    cfg = plain(dataset_cfg)
    train_spec, eval_spec = dataset_specs(cfg)
    train, train_sources = load_dataset_split(train_spec, "dataset.train")
    report: dict[str, Any] = {"train": {"sources": train_sources}, "eval": None}
    eval_ds = None
    if isinstance(eval_spec, Mapping) and "from_train" in eval_spec:
        options = eval_spec["from_train"] or {}
        unknown = sorted(set(options) - set(FROM_TRAIN_KEYS)) + sorted(
            set(eval_spec) - {"from_train"}
        )
        if unknown:
            raise ConfigError(
                f"dataset.eval.from_train: unknown keys {unknown}; allowed: {FROM_TRAIN_KEYS}"
            )
        seed = options.get("seed")
        seed = parse_spec(train_spec, "dataset.train").seed if seed is None else seed
        train, eval_ds = split_dataset(
            train, options.get("size"), options.get("fraction"), options.get("stratify_by"), seed
        )
        report["eval"] = {"from_train": {**options, "seed": seed}}
    elif eval_spec is not None:
        eval_ds, eval_sources = load_dataset_split(eval_spec, "dataset.eval")
        report["eval"] = {"sources": eval_sources}
    train = _head(train, cfg.get("max_train_examples"))
    report["train"]["rows"] = len(train)
    if eval_ds is not None:
        eval_ds = _head(eval_ds, cfg.get("max_eval_examples"))
        report["eval"]["rows"] = len(eval_ds)
    return train, eval_ds, report


# --- Saving -----------------------------------------------------------------------------------


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
