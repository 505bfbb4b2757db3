"""Tokenized preference pairs: one row per pair, chosen and rejected back to back.

A tokenized pair is ONE row holding the chosen and the rejected conversation back to back, with
``position_ids`` restarting at the rejected one: a single padding-free forward scores both, and
attention never crosses from one to the other (see ``data_sft/packing.py``). Only the reply
tokens (``chosen`` / ``rejected`` and their end-of-turn token) are completion tokens.

Lengths (``data.truncation``, the key SFT uses): a pair is too long when its prompt has more
than ``max_prompt_length`` tokens (``training_args.max_prompt_length``, default
``model.max_seq_length - 1``) or a side (prompt + reply) more than ``model.max_seq_length``.

* ``drop``: the pair is dropped and counted as ``prompt_too_long`` or ``too_long``;
* ``truncate``: the prompt keeps its tail, the last tokens before the reply (and a leading BOS
  when the sequence starts with one), as many as fit ``max_prompt_length`` and, next to the
  longer reply, ``max_seq_length``; both sides keep the same number of prompt tokens. A reply
  that still does not fit (next to the BOS and the last prompt token) loses its tail. Counted
  as truncated, per reason.

Pairs that the chat encoder drops (e.g. starting with an assistant turn, or, with
``data.non_alternating_roles=drop``, non-alternating roles) are counted per reason too.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from post_training.data_preference.pairs import (
    PreferenceSource,
    load_preference_pairs,
    spec_label,
)
from post_training.data_preference.unpaired import kto_rows, load_unpaired_examples
from post_training.data_sft.tokenize import ChatEncoder, FilterReport, make_example
from post_training.errors import DataError
from post_training.losses.constants import IGNORE_INDEX

log = logging.getLogger(__name__)

PAIR_SCALARS = (
    "kto_label",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_quantile_reward",
    "rejected_quantile_reward",
    "margin",
)
SIDES = ("chosen", "rejected")
Example = dict[str, np.ndarray]


@dataclass
class PairReport(FilterReport):
    """:class:`FilterReport` counted in pairs, with the truncations per reason
    (``prompt_too_long``: the prompt over ``max_prompt_length``; ``too_long``: a side over
    ``max_seq_length``)."""

    truncated_by: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "none"

        return (
            f"{name}: kept {self.kept} of {self.total} pairs (truncated {self.truncated}: "
            f"{counts(self.truncated_by)}; merged roles in {self.merged} conversations); "
            f"dropped: {counts(self.dropped)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "truncated_by": dict(self.truncated_by)}


def _unlimited(encoder: ChatEncoder) -> ChatEncoder:
    """A copy of ``encoder`` that never drops or cuts for length: the pair policy does."""
    out = copy.copy(encoder)
    out.options = dataclasses.replace(encoder.options, max_seq_length=sys.maxsize)
    return out


def _prompt_length(example: Example) -> int:
    """Tokens before the first completion token (the prompt and its generation prompt)."""
    return int(np.argmax(example["completion_mask"] == 1))


def _cut(example: Example, budget: int, bos: int, limit: int) -> Example:
    """``example`` with its prompt cut to its last ``budget`` tokens (keeping the first ``bos``
    tokens) and the whole cut to ``limit`` tokens."""
    ids, completion = example["input_ids"], example["completion_mask"]
    start = _prompt_length(example)
    first = max(bos, start - (budget - bos))
    keep = np.concatenate([np.arange(bos), np.arange(first, len(ids))])[:limit]
    return make_example(ids[keep], completion[keep])


def fit_pair(
    chosen: Example,
    rejected: Example,
    truncation: str,
    max_prompt_length: int,
    max_seq_length: int,
    bos_id: int | None,
) -> tuple[tuple[Example, Example] | None, str | None]:
    """The pair within the limits (see the module docstring) and, when it was too long, the
    reason (``prompt_too_long`` or ``too_long``); ``(None, reason)`` when it is dropped."""
    sides = (chosen, rejected)
    prompt = max(_prompt_length(e) for e in sides)
    if prompt > max_prompt_length:
        reason = "prompt_too_long"
    elif any(len(e["input_ids"]) > max_seq_length for e in sides):
        reason = "too_long"
    else:
        return sides, None
    if truncation == "drop":
        return None, reason
    bos = int(bos_id is not None and all(e["input_ids"][0] == bos_id for e in sides))
    reply = max(len(e["input_ids"]) - _prompt_length(e) for e in sides)
    floor = min(max_prompt_length, bos + 1)  # the BOS and the last prompt token
    budget = max(min(max_prompt_length, max_seq_length - reply), floor)
    cut = tuple(_cut(e, budget, bos, max_seq_length) for e in sides)
    if not all(e["completion_mask"][1:].any() for e in cut):
        return None, "no_completion_after_truncation"
    return (cut[0], cut[1]), reason


def _join(chosen: Example, rejected: Example) -> dict[str, np.ndarray]:
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
    return pair


def _drop_reason(encoder: ChatEncoder, conversations: list[tuple[list, int]], where: str) -> str:
    """Why the encoder dropped a side of one pair (re-encoded alone, for the report)."""
    report = FilterReport()
    encoder.encode(conversations, where, report)
    return min(report.dropped) if report.dropped else "dropped"


def encode_pairs(
    rows: Sequence[Mapping[str, Any]],
    encoder: ChatEncoder,
    where: str,
    max_prompt_length: int,
    report: FilterReport | None = None,
    locate: Callable[[int], str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Tokenized pairs (see the module docstring), ``row_index`` the index in ``rows``;
    lengths handled by ``encoder.options.truncation``; ``report`` counts pairs. Errors name
    ``where`` and ``locate(i)`` (default: the 1-based row)."""
    report = report if report is not None else PairReport()
    unlimited = _unlimited(encoder)

    def label(i: int) -> str:
        return f"{where}: {locate(i)}" if locate is not None else f"{where}: row {i + 1}"

    conversations = [
        (list(r["prompt"]) + list(r[side]), len(r["prompt"])) for r in rows for side in SIDES
    ]
    side_report = FilterReport()
    examples, kept = unlimited.encode(
        conversations,
        where,
        side_report,
        locate=lambda j: f"{label(j // 2)}: {SIDES[j % 2]} conversation",
    )
    report.total += len(rows)
    report.merged += side_report.merged
    report.boundary_tokens += side_report.boundary_tokens
    by_index = dict(zip(kept, examples, strict=True))
    options = encoder.options
    pairs = []
    for i, row in enumerate(rows):
        chosen, rejected = by_index.get(2 * i), by_index.get(2 * i + 1)
        if chosen is None or rejected is None:
            report.dropped[_drop_reason(unlimited, conversations[2 * i : 2 * i + 2], where)] += 1
            continue
        fitted, reason = fit_pair(
            chosen,
            rejected,
            options.truncation,
            max_prompt_length,
            options.max_seq_length,
            encoder.bos_id,
        )
        if fitted is None:
            report.dropped[str(reason)] += 1
            continue
        if reason is not None:
            report.truncated += 1
            if isinstance(report, PairReport):
                report.truncated_by[reason] += 1
        pair = _join(*fitted)
        for key in PAIR_SCALARS:
            if row.get(key) is not None:
                pair[key] = np.float64(row[key])
        pair["row_index"] = np.int64(i)
        pairs.append(pair)
    report.kept += len(pairs)
    if not pairs:
        raise DataError(f"{where}: no pair left after filtering ({dict(report.dropped)})")
    return pairs


def load_preference_data(
    config: Mapping[str, Any], tokenizer: Any
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], dict[str, Any]]:
    """Tokenized train / eval pairs of ``config["dataset"]`` and the filter reports. For
    ``trainer=kto`` the rows are unpaired examples, each as a pair-shaped row with its KL
    completion (:mod:`post_training.data_preference.unpaired`)."""
    kto = (config.get("trainer") or {}).get("name") == "kto"  # the alignment stages have none
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
        if kto:  # unpaired examples, each with its KL completion, shaped as pairs
            unpaired = load_unpaired_examples(spec, where, bool(dataset.get("unpair")))
            source = PreferenceSource(
                kto_rows(unpaired.examples, where), unpaired.locate, unpaired.dropped
            )
        else:
            source = load_preference_pairs(spec, where)
        report = PairReport()
        out[split] = encode_pairs(
            source.pairs, encoder, where, max_prompt, report, locate=source.locate
        )
        report.total += sum(source.dropped.values())  # dropped before encoding (empty replies)
        report.dropped.update(source.dropped)
        log.info(report.summary(f"{where} ({spec_label(spec)})"))
        reports[split] = report.as_dict()
        for key in PAIR_SCALARS:
            present = [key in p for p in out[split]]
            if any(present) and not all(present):
                missing = int(out[split][present.index(False)]["row_index"])
                raise DataError(
                    f"{where}: {source.locate(missing)} has no '{key}' while other rows have it"
                )
    return out["train"], out["eval"], reports


def describe_reports(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """The filter reports of the splits in words: ``train pairs: 1200 of 1250 kept, 30 truncated
    (prompt_too_long 30) (dropped: prompt_too_long 50)``."""

    def counts(values: Mapping[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(values.items()))

    parts = []
    for split, report in reports.items():
        truncated = report.get("truncated", 0)
        by = counts(report.get("truncated_by") or {})
        dropped = counts(report.get("dropped") or {})
        parts.append(
            f"{split} pairs: {report['kept']} of {report['total']} kept"
            + (f", {truncated} truncated" + (f" ({by})" if by else "") if truncated else "")
            + (f" (dropped: {dropped})" if dropped else "")
        )
    return "; ".join(parts) or "no pairs"
