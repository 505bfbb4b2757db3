"""Alignment rows of a dataset split and the filter that keeps the prompts which fit a model:
the library behind stage 1 (``filter_dataset_for_model``) and ``train_online``'s prompts.

- an SFT dataset (``messages``): the prompt is the conversation before the last assistant turn,
  whose content becomes ``answer`` (what a reward function can compare with);
- a preference dataset (a preference transform such as ``preference``): ``prompt``, ``chosen``,
  ``rejected`` and any rewards are kept as the offline pair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from post_training.data_alignment.stage import prompt_ids
from post_training.data_preference.pairs import is_preference_spec, load_preference_rows
from post_training.data_sft.dataset_config import dataset_specs, load_train_eval
from post_training.data_sft.tokenize import FilterReport
from post_training.errors import ConfigError

RESERVED = ("id", "prompt", "answer", "messages", "source")


def split_spec(dataset_cfg: Mapping[str, Any], split: str) -> Any:
    if split not in ("train", "eval"):
        raise ConfigError(f"alignment.split must be train or eval, got {split!r}")
    train, eval_spec = dataset_specs(dataset_cfg)
    spec = train if split == "train" else eval_spec
    if spec is None:
        raise ConfigError(f"dataset {dataset_cfg.get('name')}: no {split} split")
    return spec


def read_rows(dataset_cfg: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Canonical alignment rows of one split (see the module docstring)."""
    spec = split_spec(dataset_cfg, split)
    where = f"dataset.{split}"
    if is_preference_spec(spec):
        spec = dict(spec)
        if dataset_cfg.get(f"max_{split}_examples"):
            spec["max_examples"] = dataset_cfg[f"max_{split}_examples"]
        pairs = load_preference_rows(spec, where)
        return [{"id": f"{split}-{i}", **pair} for i, pair in enumerate(pairs)]
    train, eval_ds, _ = load_train_eval(dataset_cfg)
    ds = train if split == "train" else eval_ds
    if ds is None:
        raise ConfigError(f"dataset {dataset_cfg.get('name')}: no {split} split")
    rows = []
    for i, row in enumerate(ds):
        messages = row["messages"]
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        out = {"id": f"{split}-{i}", "prompt": messages[:last], "answer": messages[last]["content"]}
        out.update({k: v for k, v in row.items() if k not in RESERVED})
        rows.append(out)
    return rows


def filter_rows(
    rows: list[dict[str, Any]], encoder: Any, max_prompt_length: int, max_new_tokens: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows that fit, and the report: counts per drop reason, prompt length percentiles."""
    limit = encoder.options.max_seq_length
    dropped: Counter[str] = Counter()
    lengths = [len(ids) for ids in prompt_ids(encoder, [r["prompt"] for r in rows])]
    fits = []
    for row, n in zip(rows, lengths, strict=True):
        if n > max_prompt_length:
            dropped["prompt_too_long"] += 1
        elif n + max_new_tokens > limit:
            dropped["no_room_for_max_new_tokens"] += 1
        else:
            fits.append(row)
    paired = [r for r in fits if r.get("chosen") is not None and r.get("rejected") is not None]
    unfit: set[str] = set()
    for side in ("chosen", "rejected") if paired else ():
        report = FilterReport()
        conversations = [(list(r["prompt"]) + list(r[side]), len(r["prompt"])) for r in paired]
        _, kept = encoder.encode(conversations, f"filter ({side})", report)
        kept_set = set(kept)
        unfit |= {r["id"] for i, r in enumerate(paired) if i not in kept_set}
        dropped.update({f"{side}_{reason}": n for reason, n in report.dropped.items()})
    fits = [r for r in fits if r["id"] not in unfit]
    if unfit:
        dropped["pair_does_not_fit"] = len(unfit)
    kept_ids = {r["id"] for r in fits}
    kept_lengths = sorted(n for r, n in zip(rows, lengths, strict=True) if r["id"] in kept_ids)
    percentiles = {}
    for q in (50, 90, 99, 100) if kept_lengths else ():
        percentiles[f"p{q}"] = kept_lengths[
            min(len(kept_lengths) - 1, len(kept_lengths) * q // 100)
        ]
    return fits, {
        "rows_in": len(rows),
        "rows_out": len(fits),
        "dropped": dict(sorted(dropped.items())),
        "prompt_tokens": percentiles,
    }
