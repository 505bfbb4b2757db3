"""Preference data: canonical pairs, validation with row-precise errors, and tokenized pairs.

Canonical preference row (DESIGN.md): ``prompt`` (messages ending before the reply), ``chosen`` and
``rejected`` (assistant messages), optional ``chosen_reward``, ``rejected_reward``, ``ref_rewards``
(list), ``ref_chosen_logps``, ``ref_rejected_logps``, ``chosen_quantile_reward``,
``rejected_quantile_reward``.

A tokenized pair is ONE row holding the chosen and the rejected conversation back to back, with
``position_ids`` restarting at the rejected one: a single padding-free forward scores both, and
attention never crosses from one to the other (see ``data_sft/packing.py``). Only the reply
tokens (``chosen`` / ``rejected`` and their end-of-turn token) are completion tokens.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from post_training.data_sft.sources import load_source
from post_training.data_sft.tokenize import IGNORE_INDEX, ChatEncoder, FilterReport
from post_training.errors import ConfigError, DataError

PreferenceTransform = Callable[..., dict[str, Any]]
PREFERENCE_TRANSFORMS: dict[str, PreferenceTransform] = {}
FLOAT_COLUMNS = (
    "chosen_reward",
    "rejected_reward",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_quantile_reward",
    "rejected_quantile_reward",
)
PAIR_SCALARS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_quantile_reward",
    "rejected_quantile_reward",
)


def register_preference_transform(
    name: str,
) -> Callable[[PreferenceTransform], PreferenceTransform]:
    """Register ``fn(row, **args) -> {"prompt", "chosen", "rejected", ...}``."""

    def decorator(fn: PreferenceTransform) -> PreferenceTransform:
        PREFERENCE_TRANSFORMS[name] = fn
        return fn

    return decorator


def _as_messages(value: Any, role: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        return [dict(m) for m in value]
    raise DataError(f"field '{field}' must be a string or a list of messages")


@register_preference_transform("preference")
def preference(
    row: Mapping[str, Any],
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> dict[str, Any]:
    """Explicit prompt (string or messages) + chosen / rejected (string or assistant messages),
    or the implicit-prompt form: chosen and rejected are whole conversations sharing the prompt."""
    for field in (chosen_field, rejected_field):
        if row.get(field) is None:
            raise DataError(f"missing field '{field}' (fields present: {sorted(row)})")
    chosen = _as_messages(row[chosen_field], "assistant", chosen_field)
    rejected = _as_messages(row[rejected_field], "assistant", rejected_field)
    if row.get(prompt_field) is not None:
        prompt = _as_messages(row[prompt_field], "user", prompt_field)
    else:  # implicit prompt: the longest common prefix of the two conversations
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1  # the reply starts at the first differing assistant turn
        if n == 0:
            raise DataError(f"no '{prompt_field}' and no common prompt in chosen / rejected")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """A deterministic incorrect answer of the tiny tasks (numbers: off by 1-3; words: shuffled
    or with one character changed)."""
    if answer.isdigit() and not (len(answer) > 1 and answer.startswith("0")):
        value = int(answer)
        wrong = value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
        return str(wrong)
    chars = list(answer)
    for _ in range(10):
        rng.shuffle(chars)
        if "".join(chars) != answer:
            return "".join(chars)
    i = rng.randrange(len(answer))
    return answer[:i] + ("a" if answer[i] != "a" else "b") + answer[i + 1 :]


def tiny_task_reward(prediction: str, answer: str, partial: bool = True) -> float:
    """Reward of a tiny-task answer: 1 when exact; else, with ``partial``, half the character
    similarity (``difflib`` ratio), so that wrong answers are ranked and quantiles spread."""
    prediction, answer = prediction.strip(), answer.strip()
    if prediction == answer:
        return 1.0
    if not partial:
        return 0.0
    return 0.5 * difflib.SequenceMatcher(None, prediction, answer).ratio()


@register_preference_transform("tiny_task_pairs")
def tiny_task_pairs(row: Mapping[str, Any], seed: int = 0, partial: bool = True) -> dict[str, Any]:
    """Pairs from an embedded tiny-tasks row: the correct final answer vs a wrong one (rewards
    from :func:`tiny_task_reward`), deterministic per prompt and seed."""
    messages = row.get("messages")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("field 'messages' must end with an assistant turn")
    answer = messages[-1]["content"]
    key = f"{seed}:{[m['content'] for m in messages]}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    wrong = _wrong_answer(answer, rng)
    out: dict[str, Any] = {
        "prompt": [dict(m) for m in messages[:-1]],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong}],
        "chosen_reward": 1.0,
        "rejected_reward": tiny_task_reward(wrong, answer, partial),
    }
    return out


def _check_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"field '{field}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(f"field '{field}' is {value} (NaN or infinite)")
    return float(value)


def validate_pair(row: Mapping[str, Any], ref_rewards_count: int | None) -> dict[str, Any]:
    """Check a canonical pair; raises :class:`DataError` naming the field (the caller adds the
    file and row)."""
    out = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if not out["prompt"] or out["prompt"][-1]["role"] == "assistant":
        raise DataError("field 'prompt' must be non-empty and end before the reply")
    for field in ("chosen", "rejected"):
        msgs = out[field]
        if not msgs or any(m.get("role") != "assistant" for m in msgs):
            raise DataError(f"field '{field}' must be one or more assistant messages")
        if not "".join(str(m.get("content") or "") for m in msgs).strip():
            raise DataError(f"field '{field}' is an empty completion")
    for field in FLOAT_COLUMNS:
        if row.get(field) is not None:
            out[field] = _check_float(row[field], field)
    if row.get("ref_rewards") is not None:
        rewards = [_check_float(r, "ref_rewards") for r in row["ref_rewards"]]
        if not rewards or (ref_rewards_count is not None and len(rewards) != ref_rewards_count):
            raise DataError(
                f"field 'ref_rewards' has {len(rewards)} values, expected {ref_rewards_count}"
            )
        out["ref_rewards"] = rewards
    for side in ("chosen", "rejected"):
        q = out.get(f"{side}_quantile_reward")
        if q is not None and not 0.0 <= q <= 1.0:
            raise DataError(f"field '{side}_quantile_reward' must be in [0, 1], got {q}")
        if q is None and "ref_rewards" in out and f"{side}_reward" in out:
            ref = np.asarray(out["ref_rewards"])
            out[f"{side}_quantile_reward"] = float((ref <= out[f"{side}_reward"]).mean())
    return out


def load_preference_rows(spec: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Canonical, validated pairs of one source spec (``path``, ``transform``,
    ``transform_args``, ``max_examples``, ``ref_rewards_count``)."""
    name = spec.get("transform", "preference")
    if name not in PREFERENCE_TRANSFORMS:
        raise ConfigError(
            f"{where}.transform {name!r}: available preference transforms "
            f"{sorted(PREFERENCE_TRANSFORMS)}"
        )
    transform = PREFERENCE_TRANSFORMS[name]
    args = dict(spec.get("transform_args") or {})
    source_spec = {
        k: v
        for k, v in spec.items()
        if k not in ("transform", "transform_args", "max_examples", "ref_rewards_count")
    }
    raw = load_source(source_spec, where)
    limit = spec.get("max_examples")
    count = spec.get("ref_rewards_count")
    rows = []
    for index, row in enumerate(raw):
        if limit is not None and index >= limit:
            break
        try:
            pair = transform(row, **args)
            for column in (*FLOAT_COLUMNS, "ref_rewards"):  # carried over unless transformed
                if row.get(column) is not None and column not in pair:
                    pair[column] = row[column]
            pair = validate_pair(pair, count)
        except DataError as err:
            raise DataError(f"{where} ({spec['path']}): row {index}: {err}") from None
        if count is None and "ref_rewards" in pair:
            count = len(pair["ref_rewards"])
        rows.append(pair)
    if not rows:
        raise DataError(f"{where} ({spec['path']}): no preference pairs")
    return rows


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
    from post_training.data_sft.load import tokenize_options
    from post_training.data_sft.templates import ChatTemplate, resolve_template

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


def require_columns(pairs: Sequence[Mapping[str, Any]], keys: Sequence[str], where: str) -> None:
    """A clear error, before training, for the first pair lacking one of ``keys``."""
    for pair in pairs:
        for key in keys:
            if key not in pair:
                raise DataError(
                    f"{where}: row {int(pair['row_index'])} has no '{key}' (QRPO needs quantile "
                    "rewards: give chosen_quantile_reward / rejected_quantile_reward, or "
                    "chosen_reward, rejected_reward and ref_rewards)"
                )
