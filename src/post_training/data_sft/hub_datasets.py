"""The Hub datasets a dataset config names, and the check that a run can get them.

:func:`hub_sources` walks the train and eval specs of a dataset config (single sources and
mixtures) for the sources whose ``path`` is a Hub id (``hf:ID``, or an ``org/name`` that is no
local path), without reading any data; :func:`check_hub_datasets` refuses, in one line naming
the key, the id and the command that fetches it, a Hub dataset that is not in the local cache
while downloads are off (or, online, one the Hub does not know). The download entrypoint
(:mod:`post_training.download`) fetches the same sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from post_training.data_sft.dataset_config import dataset_specs
from post_training.data_sft.sources import plain, resolve
from post_training.errors import ConfigError, ProjectError
from post_training.utils import hub_cache


@dataclass(frozen=True)
class HubSource:
    """One source spec of a dataset config that reads a Hub dataset."""

    where: str  # the spec's config key: dataset.train, dataset.eval.sources[1], ...
    repo_id: str
    spec: dict[str, Any]

    @property
    def data_files(self) -> list[str]:
        """The spec's ``data_files`` patterns (none: the whole repository or its subset)."""
        return hub_cache.data_file_patterns(self.spec.get("data_files"))


def _split_sources(spec: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(spec, Mapping) or "from_train" in spec:
        return []
    if spec.get("sources"):
        return [
            (f"{where}.sources[{i}]", dict(s))
            for i, s in enumerate(spec["sources"])
            if isinstance(s, Mapping)
        ]
    return [(where, dict(spec))] if spec.get("path") else []


def hub_sources(dataset_cfg: Mapping[str, Any] | None, where: str = "dataset") -> list[HubSource]:
    """The Hub sources of a dataset config's train and eval specs (no data is read; a spec
    that is no Hub dataset, or whose local path is missing, is left to the loader)."""
    if not dataset_cfg:
        return []
    cfg = plain(dataset_cfg)
    try:
        train, evaluation = dataset_specs(cfg)
    except ConfigError:
        return []
    found = []
    for split, spec in (("train", train), ("eval", evaluation)):
        for key, source in _split_sources(spec, f"{where}.{split}"):
            try:
                ref = resolve(source, key)
            except ProjectError:
                continue
            if ref.kind == "hub":
                found.append(HubSource(key, ref.target, source))
    return found


def check_hub_datasets(datasets: Mapping[str, Mapping[str, Any] | None]) -> None:
    """:class:`ConfigError` for the first Hub source of ``datasets`` (config key -> dataset
    config) that a run cannot get: offline, not in the local cache (or its Arrow cache of an
    earlier online load); online, unknown to or unreachable on the Hub. Reads no data."""
    for where, dataset_cfg in datasets.items():
        for source in hub_sources(dataset_cfg, where):
            subset = source.spec.get("config_name") if not source.data_files else None
            subsets = [str(subset)] if subset else []
            problem = hub_cache.dataset_cache_problem(
                source.repo_id, source.data_files, source.spec.get("cache_dir"), subsets
            )
            if problem is None:
                continue
            subject = f"{source.where}.path={source.spec['path']!r}"
            if hub_cache.datasets_offline():
                fetch = hub_cache.dataset_fetch_args(source.where, source.repo_id, source.spec)
                raise ConfigError(hub_cache.not_cached_line(subject, problem, fetch))
            access = hub_cache.hub_access_problem(source.repo_id, "dataset")
            if access is not None:
                raise ConfigError(f"{subject}: the Hub dataset {source.repo_id!r} {access}")
