"""Deterministic train / eval splits, optionally stratified by a column.

The eval size is absolute (``size``) or a fraction of the rows (rounded half up). Stratified by a
column (``source``, ``task``, ...), each stratum (distinct value; null is a value) gets eval rows
in proportion to its size, rounded by largest remainder so the total is exact; then, when the
eval size allows it (at least one row per stratum of two or more rows), every stratum of two or
more rows gets at least one eval row and keeps at least one train row, the rows moved for that
coming from the strata furthest above their proportional share. Strata of one row only get an
eval row by rounding. Both splits keep the input's row order.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from post_training.errors import ConfigError

log = logging.getLogger(__name__)


def largest_remainder(quotas: Sequence[float], total: int) -> list[int]:
    """Integers summing to ``total``, each the floor of its quota, plus one for the largest
    fractional parts (ties: lower index first)."""
    floors = [math.floor(q) for q in quotas]
    left = total - sum(floors)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[: max(left, 0)]:
        floors[i] += 1
    return floors


def eval_count(n: int, size: int | None = None, fraction: float | None = None) -> int:
    """Number of eval rows out of ``n`` for an absolute ``size`` or a ``fraction``."""
    if (size is None) == (fraction is None):
        raise ConfigError(f"give exactly one of eval size or fraction (got {size=}, {fraction=})")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ConfigError(f"eval fraction must be in (0, 1), got {fraction}")
        size = math.floor(fraction * n + 0.5)
    assert size is not None
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < n:
        raise ConfigError(f"eval size must be an integer in [1, {n - 1}] for {n} rows, got {size}")
    return size


def stratified_allocation(sizes: Sequence[int], n_eval: int) -> list[int]:
    """Eval rows per stratum: proportional, exact total, minimums as in the module docs."""
    n = sum(sizes)
    quotas = [n_eval * s / n for s in sizes]
    alloc = largest_remainder(quotas, n_eval)
    low = [1 if s >= 2 else 0 for s in sizes]
    high = [s - 1 if s >= 2 else s for s in sizes]
    if not sum(low) <= n_eval <= sum(high):
        log.warning(
            "eval size %d is too small to give each of %d strata an eval row", n_eval, sum(low)
        )
        return alloc
    ids = range(len(sizes))
    while True:
        under = [i for i in ids if alloc[i] < low[i]]
        over = [i for i in ids if alloc[i] > high[i]]
        if under:
            donors = [j for j in ids if alloc[j] > low[j]]
            donor = max(donors, key=lambda j: (alloc[j] - quotas[j], -j))
            alloc[under[0]] += 1
            alloc[donor] -= 1
        elif over:
            takers = [j for j in ids if alloc[j] < high[j]]
            taker = min(takers, key=lambda j: (alloc[j] - quotas[j], j))
            alloc[over[0]] -= 1
            alloc[taker] += 1
        else:
            return alloc


def _key(value: Any) -> str:
    """A stratum's name: the value if it is a string, else its JSON (``null``, ``3``, ...)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def strata(ds: Dataset, column: str) -> dict[str, list[int]]:
    """Row indices of ``ds`` by value of ``column`` (keys as :func:`_key`, sorted)."""
    if column not in ds.column_names:
        raise ConfigError(
            f"stratify_by '{column}' is not a column; columns: {', '.join(ds.column_names)}"
        )
    groups: dict[str, list[int]] = {}
    for index, value in enumerate(ds[column]):
        groups.setdefault(_key(value), []).append(index)
    return dict(sorted(groups.items()))


def count_by(ds: Dataset, column: str) -> dict[str, int]:
    """Rows per value of ``column`` (keys as in :func:`strata`)."""
    return {key: len(rows) for key, rows in strata(ds, column).items()}


def split_dataset(
    ds: Dataset,
    size: int | None = None,
    fraction: float | None = None,
    stratify_by: str | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """``(train, eval)``: a deterministic random eval split of ``size`` rows or ``fraction`` of
    the rows, stratified by column ``stratify_by`` when given (see module docs)."""
    n_eval = eval_count(len(ds), size, fraction)
    rng = np.random.default_rng(seed)
    if stratify_by is None:
        chosen = rng.choice(len(ds), n_eval, replace=False)
    else:
        groups = list(strata(ds, stratify_by).values())
        alloc = stratified_allocation([len(g) for g in groups], n_eval)
        chosen = np.concatenate(
            [
                np.asarray(g)[rng.choice(len(g), k, replace=False)]
                for g, k in zip(groups, alloc, strict=True)
            ]
        )
    is_eval = np.zeros(len(ds), dtype=bool)
    is_eval[chosen] = True
    return ds.select(np.flatnonzero(~is_eval)), ds.select(np.flatnonzero(is_eval))
