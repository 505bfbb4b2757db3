"""Unpaired preference examples for KTO: ``{prompt, completion, label}`` rows, or preference
pairs split in two (``dataset.unpair=true``: chosen → label true, rejected → label false).

:func:`load_unpaired_examples` reads one source spec and returns validated examples with
where each came from. A row is unpaired when it has ``completion`` and ``label`` (and no
transform is configured); ``prompt`` / ``completion`` are strings, one message or a
conversation, as for pairs; ``label`` is a boolean (or 0 / 1). Errors name the split, the file
and 1-based row (``file:line``), and the field. An empty completion is dropped and counted
(``empty_completion``), as an empty reply of a pair.

:func:`kto_rows` gives each example its **KL completion**: the completion of the nearest
earlier example of the split (cyclically) whose prompt differs, so ``(x_i, y_j)`` is a
mismatched pair as KTO's KL estimate needs (TRL rotates the completions of each batch by one,
which pairs a prompt with its own other reply when paired data was unpaired). The rows are
pair-shaped (``chosen`` = the example's completion, ``rejected`` = the KL completion,
``kto_label``), so they tokenize as pairs: one padding-free row with both documents.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from post_training.data_preference.pairs import (
    PROMPT_ROLES,
    SPEC_KEYS,
    EmptyCompletion,
    Locate,
    collect_rows,
    load_mixed,
    load_preference_pairs,
    row_locator,
)
from post_training.data_preference.transforms import as_messages
from post_training.data_sft.sources import load
from post_training.data_sft.transforms import FieldError
from post_training.errors import DataError

UNPAIRED_FIELDS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class UnpairedSource:
    """Validated examples ``{prompt, completion, label}`` of one source spec, where each came
    from (``locate(i)``) and the rows dropped per reason."""

    examples: list[dict[str, Any]]
    locate: Locate
    dropped: dict[str, int]


def validate_unpaired(row: Mapping[str, Any]) -> dict[str, Any]:
    """Check one unpaired row; DataError naming the field (the caller adds file and row)."""
    try:
        prompt = as_messages(row.get("prompt"), "prompt", "user")
        completion = as_messages(row.get("completion"), "completion", "assistant")
    except FieldError as err:
        raise DataError(str(err)) from None
    for i, message in enumerate(prompt):
        if message["role"] not in PROMPT_ROLES:
            raise DataError(f"field 'prompt[{i}].role' must be one of {PROMPT_ROLES}")
    if prompt[-1]["role"] == "assistant":
        raise DataError("field 'prompt' must end before the reply (its last turn is assistant)")
    if any(m["role"] != "assistant" for m in completion):
        roles = [m["role"] for m in completion]
        raise DataError(f"field 'completion' must be assistant messages only, got roles {roles}")
    label = row.get("label")
    if isinstance(label, bool):
        pass
    elif isinstance(label, int) and label in (0, 1):
        label = bool(label)
    else:
        shown = "missing" if label is None else f"{label!r} ({type(label).__name__})"
        raise DataError(f"field 'label' must be true or false, got {shown}")
    if not "".join(m["content"] for m in completion).strip():
        raise EmptyCompletion("completion")
    return {"prompt": prompt, "completion": completion, "label": label}


def _is_unpaired(row: Mapping[str, Any]) -> bool:
    """Not a pair (a file's rows share their columns, so an absent field reads as None)."""
    return row.get("chosen") is None and row.get("rejected") is None


def load_unpaired_examples(spec: Mapping[str, Any], where: str, unpair: bool) -> UnpairedSource:
    """The examples of one source spec, or of a mixture of sources
    (:func:`~post_training.data_preference.pairs.load_mixed`; see the module docstring). With
    ``unpair``, the rows are preference pairs (any preference format or transform) and each
    gives two examples."""
    if "sources" in spec and not unpair:  # unpair: the pairs are mixed, then split

        def load_one(one: Mapping[str, Any], at: str) -> tuple[list, Locate, dict[str, int]]:
            source = load_unpaired_examples(one, at, unpair)
            return source.examples, source.locate, source.dropped

        return UnpairedSource(*load_mixed(spec, where, load_one))
    if unpair:
        source = load_preference_pairs(spec, where)
        examples = [
            {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
            for pair in source.pairs
            for side in ("chosen", "rejected")
        ]
        return UnpairedSource(examples, lambda i: source.locate(i // 2), source.dropped)
    source_spec = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    loaded = load(source_spec, where)

    def validate(row: Mapping[str, Any]) -> dict[str, Any]:
        if spec.get("transform") or not _is_unpaired(row):
            has = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"KTO needs unpaired rows with fields {', '.join(UNPAIRED_FIELDS)} (this row "
                f"has: {has}); for preference pairs (or a pair transform) set "
                "dataset.unpair=true"
            )
        return validate_unpaired(row)

    locate = row_locator(source_spec, loaded.locate, where)
    return UnpairedSource(
        *collect_rows(loaded.dataset, validate, locate, spec, where, "unpaired examples")
    )


def kl_partners(examples: list[Mapping[str, Any]], where: str) -> list[int]:
    """For each example, the index of the nearest earlier example (cyclically) whose prompt
    differs: its KL completion. DataError when every prompt is the same."""
    keys = [json.dumps(e["prompt"], sort_keys=True) for e in examples]
    n = len(keys)
    partners = []
    for i, key in enumerate(keys):
        for step in range(1, n):
            j = (i - step) % n
            if keys[j] != key:
                partners.append(j)
                break
        else:
            raise DataError(
                f"{where}: KTO's KL estimate needs examples with at least two different "
                f"prompts; all {n} examples share one"
            )
    return partners


def kto_rows(examples: list[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """Pair-shaped rows (see the module docstring): ``chosen`` the example's completion,
    ``rejected`` its KL completion, ``kto_label`` 1.0 / 0.0."""
    partners = kl_partners(examples, where)
    return [
        {
            "prompt": e["prompt"],
            "chosen": e["completion"],
            "rejected": examples[j]["completion"],
            "kto_label": 1.0 if e["label"] else 0.0,
        }
        for e, j in zip(examples, partners, strict=True)
    ]


def label_balance(
    rows: list[Mapping[str, Any]], desirable_weight: float, undesirable_weight: float
) -> tuple[str, bool]:
    """A line on the desirable / undesirable balance of KTO rows (``kto_label``) and whether
    it is inside the KTO paper's advice ``λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]``."""
    n_d = sum(1 for row in rows if float(row["kto_label"]) > 0.5)
    n_u = len(rows) - n_d
    if n_u == 0 or n_d == 0:
        return f"KTO examples: {n_d} desirable, {n_u} undesirable (one side is empty)", False
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    ok = 1.0 <= ratio <= 4 / 3
    advice = (
        ""
        if ok
        else (
            "; the KTO paper advises [1, 4/3]: set trainer.desirable_weight / "
            "trainer.undesirable_weight"
        )
    )
    return (
        f"KTO examples: {n_d} desirable, {n_u} undesirable; "
        f"λ_D·n_D / (λ_U·n_U) = {ratio:.3f}{advice}",
        ok,
    )
