"""Tokenized preference pairs: one row per pair, chosen and rejected back to back.

A tokenized pair is ONE row holding the chosen and the rejected conversation back to back, with
``position_ids`` restarting at the rejected one: a single padding-free forward scores both, and
attention never crosses from one to the other (see ``data_sft/packing.py``). Only the reply
tokens (``chosen`` / ``rejected`` and their end-of-turn token) are completion tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from post_training.data_preference.pairs import load_preference_rows
from post_training.data_sft.tokenize import ChatEncoder, FilterReport
from post_training.errors import DataError
from post_training.losses.constants import IGNORE_INDEX

PAIR_SCALARS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_quantile_reward",
    "rejected_quantile_reward",
)


def encode_pairs(
    rows: Sequence[Mapping[str, Any]],
    encoder: ChatEncoder,
    where: str,
    max_prompt_length: int,
    report: FilterReport | None = None,
) -> list[dict[str, np.ndarray]]:
    """Tokenized pairs (see the module docstring); a pair is dropped when either side is."""
    report = report if report is not None else FilterReport()
    prompts = [encoder.render_prompt(list(r["prompt"])) for r in rows]
    lengths = [
        len(e.ids)
        for e in encoder.tokenizer.backend_tokenizer.encode_batch(prompts, add_special_tokens=False)
    ]
    for index, n in enumerate(lengths):
        if n > max_prompt_length:
            raise DataError(
                f"{where}: row {index}: the prompt has {n} tokens, more than the limit "
                f"{max_prompt_length} (training_args.max_prompt_length)"
            )
    conversations = [
        (list(r["prompt"]) + list(r[side]), len(r["prompt"]))
        for r in rows
        for side in ("chosen", "rejected")
    ]
    examples, kept = encoder.encode(conversations, where, report)
    by_index = dict(zip(kept, examples, strict=True))
    pairs = []
    for i, row in enumerate(rows):
        chosen, rejected = by_index.get(2 * i), by_index.get(2 * i + 1)
        if chosen is None or rejected is None:
            continue
        pair = {
            key: np.concatenate([chosen[key], rejected[key]])
            for key in ("input_ids", "labels", "prompt_mask", "completion_mask")
        }
        # The rejected side's first token is never predicted from the chosen side.
        n = len(chosen["input_ids"])
        pair["labels"][n] = IGNORE_INDEX
        pair["prompt_mask"][n] = 0
        pair["completion_mask"][n] = 0
        pair["position_ids"] = np.concatenate([np.arange(n), np.arange(len(rejected["input_ids"]))])
        for key in PAIR_SCALARS:
            if row.get(key) is not None:
                pair[key] = np.float64(row[key])
        pair["row_index"] = np.int64(i)
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{where}: no pair left after filtering ({dict(report.dropped)})")
    return pairs


def load_preference_data(
    config: Mapping[str, Any], tokenizer: Any
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], dict[str, Any]]:
    """Tokenized train / eval pairs of ``config["dataset"]`` and the filter reports."""
    from post_training.data_sft.templates import ChatTemplate, resolve_template
    from post_training.data_sft.training_data import tokenize_options

    template = resolve_template(config["model"].get("chat_template"))
    encoder = ChatEncoder(
        tokenizer,
        template if isinstance(template, ChatTemplate) else None,
        tokenize_options(config),
    )
    limit = config["training_args"].get("max_prompt_length")
    max_prompt = int(limit) if limit else int(config["model"]["max_seq_length"]) - 1
    dataset = config["dataset"]
    out: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "eval": []}
    reports: dict[str, Any] = {}
    for split in ("train", "eval"):
        spec = dataset.get(split)
        if spec is None:
            continue
        spec = dict(spec)
        if dataset.get(f"max_{split}_examples"):
            spec["max_examples"] = dataset[f"max_{split}_examples"]
        where = f"dataset.{split}"
        rows = load_preference_rows(spec, where)
        report = FilterReport()
        out[split] = encode_pairs(rows, encoder, f"{where} ({spec['path']})", max_prompt, report)
        reports[split] = report.as_dict()
        for key in PAIR_SCALARS:
            present = [key in p for p in out[split]]
            if any(present) and not all(present):
                missing = present.index(False)
                raise DataError(
                    f"{where} ({spec['path']}): row {int(out[split][missing]['row_index'])} has no "
                    f"'{key}' while other rows have it"
                )
    return out["train"], out["eval"], reports


def describe_reports(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """The filter reports of the splits in words: ``train: 1200 of 1250 kept (dropped:
    prompt_too_long 50)``."""
    parts = []
    for split, report in reports.items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.get("dropped", {}).items()))
        parts.append(
            f"{split} conversations: {report['kept']} of {report['total']} kept"
            + (f" (dropped: {dropped})" if dropped else "")
        )
    return "; ".join(parts) or "no pairs"
