"""Stage 1: the prompts (and offline pairs) of a dataset that fit the model, as alignment rows.

    python -m post_training.data_alignment.filter_dataset_for_model [dataset=...] [model=...]

Reads ``dataset`` (split ``alignment.split``) with its transform:
- an SFT dataset (``messages``): the prompt is the conversation before the last assistant turn,
  whose content becomes ``answer`` (what a reward function can compare with);
- a preference dataset (a preference transform such as ``preference``): ``prompt``, ``chosen``,
  ``rejected`` and any rewards are kept as the offline pair.

A row is kept when its templated prompt plus ``max_new_tokens`` fits ``model.max_seq_length``
(and ``filter.max_prompt_length`` if set), and, for offline pairs, when prompt + reply fits too.
Drops are counted per reason in the manifest's report. Output rows: ``id`` (``<split>-<row>``),
``prompt``, then ``answer`` / ``chosen`` / ``rejected`` / rewards / kept columns as present.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from post_training.data_alignment.stage import (
    begin,
    chat_encoder,
    check_user_turn,
    model_identity,
    open_stage,
    prompt_ids,
)
from post_training.data_preference.pairs import load_preference_rows
from post_training.data_preference.transforms import PREFERENCE_TRANSFORMS
from post_training.data_sft.dataset_config import dataset_specs, load_train_eval
from post_training.data_sft.hub_datasets import check_hub_datasets
from post_training.data_sft.tokenize import FilterReport
from post_training.data_sft.training_data import spec_fingerprints
from post_training.errors import ConfigError
from post_training.frame import entrypoint
from post_training.modeling.loading import load_tokenizer

log = logging.getLogger(__name__)
STAGE = "filter_dataset_for_model"
RESERVED = ("id", "prompt", "answer", "messages", "source")


def _split_spec(dataset_cfg: Mapping[str, Any], split: str) -> Any:
    if split not in ("train", "eval"):
        raise ConfigError(f"alignment.split must be train or eval, got {split!r}")
    train, eval_spec = dataset_specs(dataset_cfg)
    spec = train if split == "train" else eval_spec
    if spec is None:
        raise ConfigError(f"dataset {dataset_cfg.get('name')}: no {split} split")
    return spec


def read_rows(dataset_cfg: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Canonical alignment rows of one split (see the module docstring)."""
    spec = _split_spec(dataset_cfg, split)
    where = f"dataset.{split}"
    if isinstance(spec, Mapping) and spec.get("transform") in PREFERENCE_TRANSFORMS:
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


def run(cfg: DictConfig) -> Path:
    config, partition = begin(cfg)
    check_hub_datasets({"dataset": config["dataset"]})  # offline: in the cache, or one line
    split = config["alignment"]["split"]
    options = config["filter"]
    settings = {
        "dataset": config["dataset"],
        "split": split,
        "filter": options,
        "max_new_tokens": config["alignment"]["max_new_tokens"],
        "model": model_identity(config["model"]),
        "data": config["data"],
    }
    inputs = [
        {
            "dataset": config["dataset"].get("name"),
            "fingerprints": spec_fingerprints(_split_spec(config["dataset"], split)),
        }
    ]
    with open_stage(config, STAGE, settings, inputs) as out:
        if out.done:
            return out.path
        rows = read_rows(config["dataset"], split)
        check_user_turn(rows, f"dataset {config['dataset'].get('name')} ({split})")
        tokenizer = load_tokenizer(config["model"])
        encoder = chat_encoder(config, tokenizer, truncation="drop")
        max_new = int(config["alignment"]["max_new_tokens"])
        limit = options.get("max_prompt_length") or encoder.options.max_seq_length
        mine = partition.select(rows)
        kept, report = filter_rows(mine, encoder, int(limit), max_new)
        if not kept:
            raise ConfigError(
                f"{STAGE}: no row of partition {partition.name} fits the model "
                f"(max_seq_length {encoder.options.max_seq_length}, max_new_tokens {max_new}): "
                f"{report['dropped']}"
            )
        log.info(
            "%s: kept %d of %d rows; dropped %s", STAGE, len(kept), len(mine), report["dropped"]
        )
        out.rows, out.report = kept, report
    return out.path


main = entrypoint("filter-dataset-for-model")(run)


if __name__ == "__main__":
    main()
