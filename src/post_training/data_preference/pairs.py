"""Canonical preference pairs of a source: transformed, validated with row-precise errors.

:func:`load_preference_rows` reads one source spec (``path``, ``transform``, ``transform_args``,
``max_examples``, ``ref_rewards_count``) and returns validated pairs; :func:`validate_pair`
checks one pair (types, finite rewards, quantile rewards in [0, 1], or computed from
``ref_rewards``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from post_training.data_preference.transforms import PREFERENCE_TRANSFORMS
from post_training.data_sft.sources import load_source
from post_training.errors import ConfigError, DataError

FLOAT_COLUMNS = (
    "chosen_reward",
    "rejected_reward",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_quantile_reward",
    "rejected_quantile_reward",
)


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
