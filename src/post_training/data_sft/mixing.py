"""Mixtures: sources transformed to canonical messages, sampled, concatenated and shuffled.

A mixture spec is ``{"sources": [...], "seed": 0, "total": null, "upsample": false,
"shuffle": true}``. Each source is a source spec (:mod:`post_training.data_sft.sources`) plus:

* ``transform`` (default ``messages``), ``transform_args`` (keyword arguments),
  ``transform_module`` (a module to import first, for ``@register_transform`` functions);
* ``keep_columns``: raw (or transform-output) columns carried into the result, null where a
  source lacks them; listing ``source`` keeps a raw ``source`` column (a saved mixture's
  provenance) instead of writing the source's name;
* at most one amount: ``count`` (rows), ``fraction`` (of the source's rows, rounded half up) or
  ``weight``; a source with none takes all its rows.

Weights are normalised over the weighted sources, which share ``total`` minus the rows the other
sources take (largest-remainder rounding, so the total is exact). With ``total: null``, the
weighted sources take the largest total for which none needs more rows than it has. Rows are
drawn without replacement; asking a source for more rows than it has is an error unless
``upsample: true``, which repeats the whole source and draws the remainder at random. Every
source draws from its own random stream seeded by ``(seed, source name)``, so adding or
reordering sources leaves the others' rows unchanged. The result holds ``messages``, ``source``
and the kept columns, shuffled with ``seed`` (a single source spec, i.e. a mapping with ``path``,
is a mixture of one that keeps the file order unless ``shuffle: true``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

from post_training.data_sft.sources import SOURCE_KEYS, LoadedSource, load, plain, stable_hash
from post_training.data_sft.splitting import largest_remainder
from post_training.data_sft.transforms import apply_transform, import_transform_module
from post_training.errors import ConfigError, DataError

MIX_SOURCE_KEYS = (
    "transform",
    "transform_args",
    "transform_module",
    "keep_columns",
    "weight",
    "fraction",
    "count",
)
"""Per-source keys of a mixture, besides the loading keys."""

MIXTURE_KEYS = ("sources", "seed", "total", "upsample", "shuffle")
AMOUNT_KEYS = ("weight", "fraction", "count")
SHUFFLE_STREAM = "\0shuffle"
"""The random stream that orders a mixture's rows."""


@dataclass(frozen=True)
class MixtureSpec:
    """A validated mixture spec (see module docs)."""

    sources: list[dict[str, Any]]
    seed: int
    total: int | None
    upsample: bool
    shuffle: bool


def _check_keys(spec: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {', '.join(allowed)}")


def _check_source(
    src: Any, where: str, source_keys: Sequence[str] = MIX_SOURCE_KEYS
) -> dict[str, Any]:
    if not isinstance(src, Mapping):
        raise ConfigError(f"{where}: a source must be a mapping with a 'path', got {src!r}")
    _check_keys(src, (*SOURCE_KEYS, *source_keys), where)
    amounts = [k for k in AMOUNT_KEYS if src.get(k) is not None]
    if len(amounts) > 1:
        raise ConfigError(f"{where}: give at most one of {AMOUNT_KEYS}, got {amounts}")
    for key in amounts:
        value = src[key]
        is_count = key == "count"
        if isinstance(value, bool) or not isinstance(value, int if is_count else (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: '{key}' must not be negative, got {value}")
    keep = src.get("keep_columns") or []
    if not isinstance(keep, list) or not all(isinstance(c, str) for c in keep):
        raise ConfigError(f"{where}: keep_columns must be a list of column names, got {keep!r}")
    if "messages" in keep:
        raise ConfigError(f"{where}: 'messages' is always kept (the transform's output)")
    return dict(src)


def parse_spec(
    spec: Mapping[str, Any], where: str = "dataset", source_keys: Sequence[str] = MIX_SOURCE_KEYS
) -> MixtureSpec:
    """Validate a mixture spec, or a single source spec as a mixture of one (``source_keys``:
    the per-source keys allowed besides the loading keys)."""
    spec = plain(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a source or mixture mapping, got {spec!r}")
    if "sources" in spec:
        _check_keys(spec, MIXTURE_KEYS, where)
        raw = spec["sources"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}.sources must be a non-empty list of sources")
        sources = [
            _check_source(s, f"{where}.sources[{i}]", source_keys) for i, s in enumerate(raw)
        ]
        shuffle = spec.get("shuffle", True)
    else:
        single = {k: v for k, v in spec.items() if k not in MIXTURE_KEYS}
        _check_keys(spec, (*SOURCE_KEYS, *source_keys, "seed", "upsample", "shuffle"), where)
        sources = [_check_source(single, where, source_keys)]
        shuffle = spec.get("shuffle", False)
    seed = spec.get("seed")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}.seed must be a non-negative integer, got {seed!r}")
    total = spec.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ConfigError(f"{where}.total must be a positive integer or null, got {total!r}")
    return MixtureSpec(sources, seed, total, bool(spec.get("upsample", False)), bool(shuffle))


def plan_counts(
    sources: Sequence[Mapping[str, Any]],
    available: Sequence[int],
    total: int | None = None,
    where: str = "dataset",
) -> list[int]:
    """Rows to take from each source (see module docs); does not check availability."""
    counts: list[int | None] = []
    for src, n in zip(sources, available, strict=True):
        if src.get("count") is not None:
            counts.append(int(src["count"]))
        elif src.get("fraction") is not None:
            counts.append(math.floor(Fraction(str(src["fraction"])) * n + Fraction(1, 2)))
        elif src.get("weight") is not None:
            counts.append(None)
        else:
            counts.append(n)
    weighted = [i for i, c in enumerate(counts) if c is None]
    if not weighted:
        if total is not None:
            raise ConfigError(f"{where}.total is set but no source has a weight to share it")
        return [int(c) for c in counts]  # type: ignore[arg-type]
    weights = {i: Fraction(str(sources[i]["weight"])) for i in weighted}
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        raise ConfigError(f"{where}: the weights of the weighted sources sum to 0")
    share = {i: w / weight_sum for i, w in weights.items()}
    if total is None:
        shared = min(math.floor(available[i] / share[i]) for i in weighted if share[i] > 0)
    else:
        fixed = sum(c for c in counts if c is not None)
        shared = total - fixed
        if shared < 0:
            raise ConfigError(
                f"{where}.total={total} is smaller than the {fixed} rows taken by the sources "
                "with a count, a fraction or no amount"
            )
    shares = largest_remainder([share[i] * shared for i in weighted], shared)
    for i, k in zip(weighted, shares, strict=True):
        counts[i] = k
    return [int(c) for c in counts]  # type: ignore[arg-type]


def source_rng(seed: int, name: str) -> np.random.Generator:
    """Random stream of one source: a function of ``(seed, name)`` only."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, name_key])


def sample_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` row indices of ``n``: whole copies of ``range(n)`` then a random remainder drawn
    without replacement (in row order). ``k == n`` is every row in order."""
    copies, rest = divmod(k, n)
    remainder = np.sort(rng.choice(n, rest, replace=False)) if rest else np.arange(0)
    return np.concatenate([np.arange(n)] * copies + [remainder]).astype(np.int64)


def _describe(src: Mapping[str, Any]) -> str:
    amount = next((k for k in AMOUNT_KEYS if src.get(k) is not None), None)
    return f"{amount} {src[amount]}" if amount else "all rows"


def _transformed(
    loaded: LoadedSource, src: Mapping[str, Any], indices: np.ndarray, where: str
) -> Dataset:
    if src.get("transform_module"):
        import_transform_module(str(src["transform_module"]))
    ds = loaded.dataset
    identity = len(indices) == len(ds) and bool(np.all(indices == np.arange(len(ds))))
    subset = ds if identity else ds.select(indices)

    def locate(j: int) -> str:
        return f"{where} '{loaded.name}': {loaded.locate(int(indices[j]))}"

    return apply_transform(
        subset,
        src.get("transform") or "messages",
        src.get("transform_args") or {},
        where=locate,
        keep_columns=src.get("keep_columns") or [],
        source=loaded.name,
    )


def concat_canonical(parts: Sequence[Dataset], names: Sequence[str]) -> pa.Table:
    """One table of canonical parts: ``messages``, ``source``, then every kept column (null
    where a part lacks it); a column whose types disagree between parts is named."""
    columns = list(dict.fromkeys(c for p in parts for c in p.column_names))
    order = ["messages", "source", *[c for c in columns if c not in ("messages", "source")]]
    tables = []
    for part in parts:
        table = part.data.table
        for column in order:
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows))
        tables.append(table.select(order))
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        for column in order:
            types = {n: t.schema.field(column).type for n, t in zip(names, tables, strict=True)}
            typed = {n: str(t) for n, t in types.items() if not pa.types.is_null(t)}
            if len(set(typed.values())) > 1:
                raise DataError(
                    f"column '{column}' has different types in different sources: {typed}"
                ) from None
        raise DataError(f"cannot concatenate the sources: {err}") from None


def select_rows(
    mix: MixtureSpec,
    names: Sequence[str],
    available: Sequence[int],
    wheres: Sequence[str],
    where: str,
) -> list[np.ndarray]:
    """Per source, the indices of the rows it gives the mixture (its amount, drawn from its own
    stream); several sources of one name, or a source asked for more rows than it has without
    ``upsample``, are refused."""
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: several sources are named {duplicates}; give each a 'name'")
    counts = plan_counts(mix.sources, available, mix.total, where)
    selected = []
    for src, name, n, k, w in zip(mix.sources, names, available, counts, wheres, strict=True):
        if k > n and not mix.upsample:
            raise DataError(
                f"{w} '{name}': {k} rows requested ({_describe(src)}) but it has {n}; "
                "set upsample: true to repeat rows, or ask for fewer"
            )
        selected.append(sample_indices(n, k, source_rng(mix.seed, name)))
    return selected


def load_dataset_split(
    spec: Mapping[str, Any], where: str = "dataset"
) -> tuple[Dataset, dict[str, dict[str, Any]]]:
    """Canonical dataset of a source or mixture spec, and per source (by name) its rows
    ``available`` and ``selected``, its ``fingerprint``, ``path`` and ``transform``."""
    mix = parse_spec(spec, where)
    multi = "sources" in plain(spec)
    wheres = [f"{where}.sources[{i}]" if multi else where for i in range(len(mix.sources))]
    loaded = [load(src, w) for src, w in zip(mix.sources, wheres, strict=True)]
    names = [s.name for s in loaded]
    available = [len(s.dataset) for s in loaded]
    selected = select_rows(mix, names, available, wheres, where)
    counts = [len(indices) for indices in selected]
    parts = [
        _transformed(source, src, indices, w)
        for src, source, indices, w in zip(mix.sources, loaded, selected, wheres, strict=True)
    ]
    table = concat_canonical(parts, names)
    if mix.shuffle:
        table = table.take(source_rng(mix.seed, SHUFFLE_STREAM).permutation(table.num_rows))
    fingerprint = stable_hash([mix.__dict__, [s.fingerprint for s in loaded]])
    report = {
        source.name: {
            "available": n,
            "selected": k,
            "fingerprint": source.fingerprint,
            "path": src["path"],
            "transform": src.get("transform") or "messages",
        }
        for src, source, n, k in zip(mix.sources, loaded, available, counts, strict=True)
    }
    return Dataset(InMemoryTable(table), fingerprint=fingerprint), report


load_mixture = load_dataset_split
"""Alias: the canonical dataset of a mixture spec and its per-source report."""
