"""Canonical preference pairs of a source: transformed, validated with row-precise errors.

:func:`load_preference_pairs` reads one source spec (``path`` and the loading keys of
:mod:`post_training.data_sft.sources`, ``transform``, ``transform_args``, ``transform_module``,
``max_examples``, ``ref_rewards_count``) and returns validated pairs with where each came from;
:func:`validate_pair` checks one pair (messages, finite rewards, quantile rewards in [0, 1], or
computed from ``ref_rewards``). The transform is looked up as the SFT transforms are
(:func:`~post_training.data_sft.transforms.get_transform`): a registered preference transform,
one registered by the ``transform_module`` imported first, or ``package.module:function``.
Errors name the split, the file and the 1-based row (``file:line`` for JSON lines and CSV, as
the SFT data does; ``path row N`` otherwise) and the field. A pair whose chosen or rejected reply
is empty (real sets have them: HH-RLHF's harmless-base test line 87) is not an error but dropped
and counted (``empty_chosen`` / ``empty_rejected``), as SFT drops an example without completion.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from post_training.data_preference.transforms import PREFERENCE_TRANSFORMS, as_messages
from post_training.data_sft.mixing import (
    AMOUNT_KEYS,
    SHUFFLE_STREAM,
    parse_spec,
    select_rows,
    source_rng,
)
from post_training.data_sft.sources import load, resolve, source_name
from post_training.data_sft.transforms import (
    TRANSFORMS,
    FieldError,
    fields_present,
    get_transform,
    import_transform_module,
)
from post_training.errors import DataError


class EmptyCompletion(DataError):
    """A chosen or rejected reply with no text: the pair is dropped and counted, not refused."""

    def __init__(self, field: str) -> None:
        super().__init__(f"field '{field}' is an empty completion")
        self.field = field


Locate = Callable[[int], str]
"""Pair index -> where its row is (``data.jsonl:12``, ``data.parquet row 3``)."""

PROMPT_ROLES = ("system", "user", "assistant")
LINE_FORMATS = ("jsonl", "csv")
"""File formats whose rows are located by their 1-based line."""
SPEC_KEYS = ("transform", "transform_args", "transform_module", "max_examples", "ref_rewards_count")
"""Keys of a preference source spec that are not loading keys."""

FLOAT_COLUMNS = (
    "chosen_reward",
    "rejected_reward",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_quantile_reward",
    "rejected_quantile_reward",
    "margin",  # train_reward: how much better chosen is (subtracted in the Bradley–Terry loss)
)


def _check_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"field '{field}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(f"field '{field}' is {value} (NaN or infinite)")
    return float(value)


def _pair_messages(row: Mapping[str, Any]) -> dict[str, Any]:
    """``prompt`` / ``chosen`` / ``rejected`` as canonical messages (strings and text blocks
    accepted, as a transform may return them); :class:`FieldError` naming the field."""
    out = {}
    for field, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        out[field] = as_messages(row.get(field), field, role)
    for i, message in enumerate(out["prompt"]):
        if message["role"] not in PROMPT_ROLES:
            raise FieldError(f"prompt[{i}].role", f"must be one of {PROMPT_ROLES}")
    return out


def validate_pair(row: Mapping[str, Any], ref_rewards_count: int | None) -> dict[str, Any]:
    """Check a canonical pair; raises :class:`DataError` naming the field (the caller adds the
    file and row)."""
    try:
        out = _pair_messages(row)
    except FieldError as err:
        if err.problem == "missing field":  # the transform's result lacks it, not the raw row
            raise DataError(f"{err} (the pair's {fields_present(row)})") from None
        raise DataError(str(err)) from None
    if out["prompt"][-1]["role"] == "assistant":
        raise DataError("field 'prompt' must end before the reply (its last turn is assistant)")
    for field in ("chosen", "rejected"):
        msgs = out[field]
        if any(m["role"] != "assistant" for m in msgs):
            roles = [m["role"] for m in msgs]
            raise DataError(f"field '{field}' must be assistant messages only, got roles {roles}")
        if not "".join(m["content"] for m in msgs).strip():
            raise EmptyCompletion(field)
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


@dataclass(frozen=True)
class PreferenceSource:
    """Validated pairs of one source spec, where each came from (``locate(i)``, i the index in
    ``pairs``) and the rows dropped per reason."""

    pairs: list[dict[str, Any]]
    locate: Locate
    dropped: dict[str, int]


def row_locator(spec: Mapping[str, Any], loaded_locate: Locate, where: str) -> Locate:
    """1-based rows: a JSON-lines / CSV file's own ``file:line``, else ``path row N``."""
    ref = resolve(spec, where)
    if ref.kind == "files" and ref.fmt in LINE_FORMATS:
        return loaded_locate
    return lambda index: f"{spec['path']} row {index + 1}"


def transform_pair(
    transform: Callable[..., Any], name: str, row: Mapping[str, Any], args: Mapping[str, Any]
) -> dict[str, Any]:
    """``transform(row, **args)`` with its errors as :class:`DataError` (naming the field, the
    transform and the fields the row has) and the reward columns carried over."""
    try:
        pair = transform(row, **args)
        if not isinstance(pair, Mapping):
            raise FieldError("prompt", f"transform returned {type(pair).__name__}, not a pair")
    except FieldError as err:
        raise DataError(f"{err} (transform '{name}'; {fields_present(row, err)})") from None
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"transform '{name}' failed with {type(err).__name__}: {err} ({fields_present(row)})"
        ) from err
    pair = dict(pair)
    for column in (*FLOAT_COLUMNS, "ref_rewards"):  # carried over unless transformed
        if row.get(column) is not None and column not in pair:
            pair[column] = row[column]
    return pair


Loaded = tuple[list[dict[str, Any]], Locate, dict[str, int]]
"""Items of a source, where each came from, and the rows dropped per reason."""


def load_mixed(
    spec: Mapping[str, Any], where: str, load_one: Callable[[Mapping[str, Any], str], Loaded]
) -> Loaded:
    """``load_one(spec, where)``, or for a mixture (``sources: [...]``, with ``seed``, ``total``,
    ``upsample``, ``shuffle`` and per source ``weight`` / ``fraction`` / ``count``, as SFT
    mixtures: :mod:`post_training.data_sft.mixing`) each source's items sampled from its own
    stream, concatenated and shuffled; ``max_examples`` then keeps the first ones. A mixed item
    is located as ``sources[i] '<name>': <file:line>``; the drop counts are summed."""
    if "sources" not in spec:
        return load_one(spec, where)
    spec = dict(spec)
    limit = spec.pop("max_examples", None)
    mix = parse_spec(spec, where, (*SPEC_KEYS, *AMOUNT_KEYS))
    wheres = [f"{where}.sources[{i}]" for i in range(len(mix.sources))]
    loaded = [
        load_one({k: v for k, v in src.items() if k not in AMOUNT_KEYS}, w)
        for src, w in zip(mix.sources, wheres, strict=True)
    ]
    names = [source_name(src) for src in mix.sources]
    selected = select_rows(mix, names, [len(items) for items, _, _ in loaded], wheres, where)
    origin = [(i, int(j)) for i, indices in enumerate(selected) for j in indices]
    if mix.shuffle:
        order = source_rng(mix.seed, SHUFFLE_STREAM).permutation(len(origin))
        origin = [origin[int(m)] for m in order]
    if limit is not None:
        origin = origin[: int(limit)]
    if not origin:
        raise DataError(f"{where}: the mixture selects no rows")
    dropped: Counter[str] = Counter()
    for _, _, counts in loaded:
        dropped.update(counts)

    def locate(m: int) -> str:
        i, j = origin[m]
        return f"sources[{i}] '{names[i]}': {loaded[i][1](j)}"

    return [loaded[i][0][j] for i, j in origin], locate, dict(dropped)


def is_preference_spec(spec: Any) -> bool:
    """A source spec whose ``transform`` is a preference transform (after importing its
    ``transform_module``) and not an SFT one, or a mixture of such sources only."""
    if not isinstance(spec, Mapping):
        return False
    if "sources" in spec:
        sources = spec["sources"] or []
        return bool(sources) and all(is_preference_spec(src) for src in sources)
    if "path" not in spec:
        return False
    if spec.get("transform_module"):
        import_transform_module(str(spec["transform_module"]))
    name = spec.get("transform")
    return name in PREFERENCE_TRANSFORMS and name not in TRANSFORMS


def spec_label(spec: Mapping[str, Any]) -> str:
    """The path of a source spec, or ``mixture of <names>``."""
    if "sources" in spec:
        return "mixture of " + ", ".join(source_name(src) for src in spec["sources"])
    return str(spec["path"])


def load_preference_pairs(spec: Mapping[str, Any], where: str) -> PreferenceSource:
    """Canonical, validated pairs of one source spec, or of a mixture of sources (see the module
    docstring and :func:`load_mixed`)."""
    return PreferenceSource(*load_mixed(spec, where, _load_pair_source))


def _load_pair_source(spec: Mapping[str, Any], where: str) -> Loaded:
    name = spec.get("transform") or "preference"
    try:
        if spec.get("transform_module"):
            import_transform_module(str(spec["transform_module"]))
        transform = get_transform(name, PREFERENCE_TRANSFORMS, "preference transform")
    except DataError as err:
        raise DataError(f"{where}.transform: {err}") from None
    args = dict(spec.get("transform_args") or {})
    source_spec = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    loaded = load(source_spec, where)
    locate = row_locator(source_spec, loaded.locate, where)
    count = spec.get("ref_rewards_count")

    def validate(row: Mapping[str, Any]) -> dict[str, Any]:
        nonlocal count
        pair = validate_pair(transform_pair(transform, name, row, args), count)
        if count is None and "ref_rewards" in pair:
            count = len(pair["ref_rewards"])
        return pair

    return collect_rows(loaded.dataset, validate, locate, spec, where, "preference pairs")


def collect_rows(
    rows: Iterable[Mapping[str, Any]],
    validate: Callable[[Mapping[str, Any]], dict[str, Any]],
    locate: Locate,
    spec: Mapping[str, Any],
    where: str,
    noun: str,
) -> tuple[list[dict[str, Any]], Locate, dict[str, int]]:
    """The first ``spec["max_examples"]`` rows through ``validate``: the kept items, where each
    came from, and the rows dropped per reason (an :class:`EmptyCompletion` drops a row and
    counts it as ``empty_<field>``); any other DataError stops with
    ``<where>: <file:line>: <error>``, and so does keeping none (``no <noun>``)."""
    limit = spec.get("max_examples")
    kept: list[dict[str, Any]] = []
    row_of: list[int] = []  # item index -> row index
    dropped: Counter[str] = Counter()
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        try:
            item = validate(row)
        except EmptyCompletion as err:
            dropped[f"empty_{err.field}"] += 1
            continue
        except DataError as err:
            raise DataError(f"{where}: {locate(index)}: {err}") from None
        kept.append(item)
        row_of.append(index)
    if not kept:
        reasons = f" (dropped: {dict(dropped)})" if dropped else ""
        raise DataError(f"{where} ({spec['path']}): no {noun}{reasons}")
    return kept, lambda i: locate(row_of[i]), dict(dropped)


def load_preference_rows(spec: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The pairs of :func:`load_preference_pairs`."""
    return load_preference_pairs(spec, where).pairs
