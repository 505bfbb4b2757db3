"""Train / eval datasets of a ``dataset/*.yaml`` config (saving built datasets:
:mod:`post_training.data_sft.saved_datasets`).

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

from collections.abc import Mapping
from typing import Any

from datasets import Dataset

from post_training.data_sft.mixing import load_dataset_split, parse_spec
from post_training.data_sft.sources import plain
from post_training.data_sft.splitting import split_dataset
from post_training.errors import ConfigError

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


def check_from_train(eval_spec: Mapping[str, Any], where: str = "dataset.eval") -> dict:
    """The options of ``{from_train: {...}}``; unknown keys refused."""
    options = eval_spec["from_train"] or {}
    unknown = sorted(set(options) - set(FROM_TRAIN_KEYS)) + sorted(set(eval_spec) - {"from_train"})
    if unknown:
        raise ConfigError(f"{where}.from_train: unknown keys {unknown}; allowed: {FROM_TRAIN_KEYS}")
    return dict(options)


def check_dataset_config(dataset_cfg: Mapping[str, Any], where: str = "dataset") -> None:
    """The train / eval specs of a dataset config checked without reading any data (keys,
    amounts, seeds), so a bad spec stops a launch before anything is written."""
    train_spec, eval_spec = dataset_specs(dataset_cfg)
    parse_spec(train_spec, f"{where}.train")
    if isinstance(eval_spec, Mapping) and "from_train" in eval_spec:
        check_from_train(eval_spec, f"{where}.eval")
    elif eval_spec is not None:
        parse_spec(eval_spec, f"{where}.eval")


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
        options = check_from_train(eval_spec)
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
