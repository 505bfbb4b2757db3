"""Where the rows of a dataset come from: local files, saved datasets, the Hugging Face Hub.

A *source spec* is a mapping. Loading keys: ``path`` (required), ``name`` (provenance written to
the ``source`` column; default: derived from the path), ``split`` (of a saved ``DatasetDict`` or a
Hub dataset; default ``train``), ``config_name`` / ``data_files`` / ``cache_dir`` (Hub only),
``text_split`` (``.txt``: ``file`` | ``line`` | ``paragraph``), ``json_field`` (``.json`` whose
top level is an object). The mixture keys (``transform``, ``weight``, ...) are read by
:mod:`post_training.data_sft.mixing`.

``path`` forms, tried in this order:

* ``jsonl:P``, ``json:P``, ``parquet:P``, ``csv:P``, ``text:P``: file(s) ``P`` in that format;
* ``local:DIR``: a dataset saved with ``save_to_disk`` (``Dataset`` or ``DatasetDict``);
* ``hf:ID``: a Hub dataset; when ``HF_HUB_OFFLINE=1``, its snapshot in the Hub cache (what
  ``python -m post_training.download`` fetches) or ``datasets``' cache of an earlier load;
* a glob (``data/*.jsonl``): every matched file, sorted, format from the extension (one format);
* an existing file (format from the extension: ``.jsonl .json .parquet .csv .txt``) or a
  directory saved with ``save_to_disk``;
* ``org/name`` that is not a local path: a Hub dataset.

Relative paths are relative to the working directory. Row locations (``LoadedSource.locate``)
are 1-based: ``file:line``, ``file item N``, ``file row N``, ``id[split] row N``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import datasets
from datasets import Dataset, DatasetDict
from datasets.table import InMemoryTable
from omegaconf import DictConfig, ListConfig, OmegaConf

from post_training.data_sft.file_formats import EXTENSIONS, FORMATS, Locate, format_of, read_files
from post_training.errors import ConfigError, DataError
from post_training.utils import hub_cache

SOURCE_KEYS = (
    "path",
    "name",
    "split",
    "config_name",
    "data_files",
    "cache_dir",
    "text_split",
    "json_field",
)
"""Keys that say how to load a source."""

PREFIXES = (*FORMATS, "local", "hf")
_PREFIX = re.compile(rf"^({'|'.join(PREFIXES)}):(.+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVED_MARKERS = (("dataset_dict.json",), ("state.json", "dataset_info.json"))


@dataclass(frozen=True)
class SourceRef:
    """A resolved ``path``: ``kind`` is ``files``, ``saved`` or ``hub``."""

    kind: str
    target: str  # the path, glob, directory or Hub id, prefix removed
    fmt: str | None = None  # file format, for ``files``
    files: tuple[Path, ...] = ()  # matched files, for ``files``


@dataclass(frozen=True)
class LoadedSource:
    """Raw rows of one source, its provenance name and where each row came from."""

    name: str
    dataset: Dataset
    locate: Locate
    fingerprint: str


def plain(spec: Any) -> Any:
    """A plain ``dict`` / ``list`` copy of an OmegaConf node or mapping (resolved)."""
    if isinstance(spec, (DictConfig, ListConfig)):
        return OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        return {k: plain(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [plain(v) for v in spec]
    return spec


def _looks_like_hub_id(path: str) -> bool:
    """``org/name`` without a data-file extension (``data/train.jsonl`` is a missing file)."""
    return bool(_HUB_ID.match(path)) and PurePath(path).suffix.lower() not in EXTENSIONS


def _is_saved_dir(path: Path) -> bool:
    return path.is_dir() and any(all((path / m).is_file() for m in ms) for ms in _SAVED_MARKERS)


def _match_files(pattern: str, fmt: str | None, where: str) -> SourceRef:
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"{where}: no file matches '{pattern}'")
    formats = {fmt} if fmt else {format_of(p) for p in paths}
    if len(formats) > 1:
        raise DataError(
            f"{where}: '{pattern}' matches files of several formats {sorted(formats)}; "
            "use one source per format or a prefix such as jsonl:PATTERN"
        )
    return SourceRef("files", pattern, formats.pop(), tuple(paths))


def resolve(spec: Mapping[str, Any], where: str = "dataset") -> SourceRef:
    """Resolve ``spec['path']`` to files, a saved dataset or a Hub id (see module docs)."""
    raw = spec.get("path")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: a source needs a 'path' (got {raw!r})")
    match = _PREFIX.match(raw)
    prefix, target = (match.group(1), match.group(2)) if match else (None, raw)
    if prefix == "hf":
        return SourceRef("hub", target)
    target = os.path.expanduser(target)
    if prefix == "local":
        if not _is_saved_dir(Path(target)):
            raise DataError(f"{where}: '{target}' is not a dataset saved with save_to_disk")
        return SourceRef("saved", target)
    if prefix is not None or glob.has_magic(target):
        return _match_files(target, prefix, where)
    path = Path(target)
    if path.is_file():
        return SourceRef("files", target, format_of(path), (path,))
    if path.is_dir():
        if _is_saved_dir(path):
            return SourceRef("saved", target)
        raise DataError(
            f"{where}: '{target}' is a directory but not a dataset saved with save_to_disk; "
            f"to read its files use a glob such as {target.rstrip('/')}/*.jsonl"
        )
    if _looks_like_hub_id(raw):
        return SourceRef("hub", raw)
    raise DataError(f"{where}: '{raw}' is no file, directory, glob or Hub id (org/name)")


def source_name(spec: Mapping[str, Any]) -> str:
    """``spec['name']``, else the Hub id or the last two parts of the path without extension."""
    if spec.get("name"):
        return str(spec["name"])
    raw = str(spec["path"])
    match = _PREFIX.match(raw)
    prefix, target = (match.group(1), match.group(2)) if match else (None, raw)
    if prefix == "hf" or (prefix is None and _looks_like_hub_id(raw) and not Path(raw).exists()):
        return target + (f":{spec['config_name']}" if spec.get("config_name") else "")
    parts = list(PurePath(target.rstrip("/")).parts[-2:])
    if PurePath(parts[-1]).suffix.lower() in EXTENSIONS:
        parts[-1] = PurePath(parts[-1]).stem
    return "/".join(parts)


def stable_hash(payload: Any) -> str:
    """Short SHA-256 of the JSON of ``payload`` (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _stat(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _options(spec: Mapping[str, Any]) -> dict[str, Any]:
    options = {k: spec.get(k) for k in SOURCE_KEYS if k not in ("name", "path")}
    options["split"] = options["split"] or "train"
    return options


def _fingerprint(ref: SourceRef, spec: Mapping[str, Any], dataset: Dataset | None) -> str:
    if ref.kind == "files":
        return stable_hash(["files", ref.fmt, _options(spec), _stat(list(ref.files))])
    if ref.kind == "saved":
        return stable_hash(["saved", _options(spec), _stat(_saved_files(ref.target))])
    assert dataset is not None
    cache_files = [Path(f["filename"]) for f in dataset.cache_files]
    return stable_hash(["hub", ref.target, _options(spec), _stat(cache_files)])


def _offline_hub_target(
    ref: SourceRef, spec: Mapping[str, Any], where: str
) -> tuple[str, dict[str, Any]]:
    """Offline, what ``datasets.load_dataset`` is given for a Hub dataset: its snapshot in the
    Hub cache (what ``python -m post_training.download`` fetched), read as a local dataset
    directory (its card's subsets included), else the id for the Arrow cache of an earlier
    online load. Neither: the one-line error with the fetch command."""
    options = {"name": spec.get("config_name"), "data_files": spec.get("data_files")}
    snapshot = hub_cache.snapshot_dir(ref.target, "dataset")
    if snapshot is not None:
        if options["name"] and options["data_files"] is None:
            declared = hub_cache.card_data_files(snapshot, options["name"])
            if declared is not None:  # only the subset's files may have been fetched
                options["data_files"], options["data_dir"] = declared
        return str(snapshot), options
    if hub_cache.in_arrow_cache(ref.target, spec.get("cache_dir")):
        return ref.target, options
    problem = hub_cache.dataset_cache_problem(ref.target, (), spec.get("cache_dir"))
    fetch = hub_cache.dataset_fetch_args(where, ref.target, spec)
    raise DataError(
        f"{where}: cannot load Hub dataset '{ref.target}': "
        + hub_cache.not_cached_line("it", problem or "is not in the local cache", fetch)
    )


def _load_hub(ref: SourceRef, spec: Mapping[str, Any], where: str) -> Dataset:
    split = spec.get("split") or "train"
    target = ref.target
    options = {"name": spec.get("config_name"), "data_files": spec.get("data_files")}
    if datasets.config.HF_HUB_OFFLINE:
        target, options = _offline_hub_target(ref, spec, where)
    try:
        ds = datasets.load_dataset(target, split=split, cache_dir=spec.get("cache_dir"), **options)
    except Exception as err:
        raise DataError(
            f"{where}: cannot load Hub dataset '{ref.target}' split '{split}' "
            f"({type(err).__name__}: {err})."
        ) from err
    return ds


def _load_saved(ref: SourceRef, spec: Mapping[str, Any], where: str) -> Dataset:
    loaded = datasets.load_from_disk(ref.target)
    split = spec.get("split")
    if isinstance(loaded, DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataError(
                f"{where}: {ref.target} has no split '{split}'; splits: {', '.join(loaded)}"
            )
        return loaded[split]
    if split not in (None, "train"):
        raise DataError(f"{where}: {ref.target} is a single Dataset; it has no split '{split}'")
    return loaded


def _saved_files(target: str) -> list[Path]:
    return sorted(p for p in Path(target).rglob("*") if p.is_file())


def load(spec: Mapping[str, Any], where: str = "dataset") -> LoadedSource:
    """Raw rows of one source with its name, row locations and fingerprint."""
    spec = plain(spec)
    ref = resolve(spec, where)
    if ref.kind == "files":
        try:
            loaded = read_files(
                ref.files, ref.fmt or "", spec.get("text_split") or "file", spec.get("json_field")
            )
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        fingerprint = _fingerprint(ref, spec, None)
        dataset = Dataset(InMemoryTable(loaded.table), fingerprint=fingerprint)
        locate = loaded.locate
    else:
        load_fn = _load_saved if ref.kind == "saved" else _load_hub
        dataset = load_fn(ref, spec, where)
        fingerprint = _fingerprint(ref, spec, dataset)
        split = spec.get("split") or "train"

        def locate(index: int, _label: str = f"{ref.target}[{split}]") -> str:
            return f"{_label} row {index + 1}"

    if len(dataset) == 0:
        raise DataError(f"{where}: '{spec['path']}' has no rows")
    return LoadedSource(source_name(spec), dataset, locate, fingerprint)


def load_source(spec: Mapping[str, Any], where: str = "dataset") -> Dataset:
    """Raw rows of one source (see module docs for the spec and path forms)."""
    return load(spec, where).dataset


def source_fingerprint(spec: Mapping[str, Any], where: str = "dataset") -> str:
    """Stable hash of what a source would load: the resolved files' paths, sizes and mtimes
    plus the loading options (a saved dataset: all its files; a Hub dataset: its cache files)."""
    spec = plain(spec)
    ref = resolve(spec, where)
    return load(spec, where).fingerprint if ref.kind == "hub" else _fingerprint(ref, spec, None)
