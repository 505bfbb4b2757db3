"""The local Hugging Face Hub cache: whether a model or dataset repository is there, why a run
cannot get it, and the command that fetches it once (``python -m post_training.download``).

Runs are offline by default (``HF_HUB_OFFLINE=1``, set by ``post_training/__init__`` unless the
user set it): a Hub id must then be in the cache (``HF_HUB_CACHE``, default
``$HF_HOME/hub``). A cached repository is ``<cache>/models--org--name/`` (``datasets--`` for a
dataset) with ``refs/main`` naming a commit and ``snapshots/<commit>/`` holding its files; the
download writes ``trees/<commit>.json`` too, the listing that tells a complete snapshot from a
partial one. The lines built here name the key, the id, the cache and the fetch command, so the
user is never left with the hub client's traceback.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOWNLOAD = "python -m post_training.download"
ONLINE = "HF_HUB_OFFLINE=0"

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template*",  # chat_template.jinja / .json
)
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
MODEL_IGNORE = (
    "*/*",  # subfolders (original/, onnx/, gguf/ ...): transformers reads the repo root
    "*.bin",
    "*.pth",
    "*.pt",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "optimizer*",
    "consolidated*",  # Mistral's single-file copy of the sharded weights
    "*.py",  # remote code is never loaded
)
DATASET_IGNORE = ("*.py", ".gitattributes")
DATASET_METADATA = ("README.md", "dataset_infos.json", ".huggingface.yaml")


# ------------------------------------------------------------------------------ environment
def offline() -> bool:
    """Downloads are off (``HF_HUB_OFFLINE``, read by huggingface_hub at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def datasets_offline() -> bool:
    """``datasets`` is offline (``HF_HUB_OFFLINE``, or its own ``HF_DATASETS_OFFLINE``)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def offline_flag() -> str:
    """The variable that turned downloads off, as the user would write it."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value and value.upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={value}"
    return "HF_HUB_OFFLINE=1"


def hub_cache_dir(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``HF_HUB_CACHE`` (default ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(Path(cache_dir or constants.HF_HUB_CACHE).expanduser())


def repo_dir(repo_id: str, repo_type: str = "model", cache_dir: str | None = None) -> Path:
    """``<cache>/models--org--name`` (``datasets--`` for a dataset)."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(hub_cache_dir(cache_dir)) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def is_hub_id(value: str) -> bool:
    """``name`` or ``org/name`` as the Hub spells repository ids (not a path)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# ------------------------------------------------------------------------------ the cache
def snapshot_dir(
    repo_id: str,
    repo_type: str = "model",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> Path | None:
    """The cached snapshot of ``revision`` (default ``main``, through ``refs/``; a commit hash
    directly), or None. Reads the cache only."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    root = repo_dir(repo_id, repo_type, cache_dir)
    revision = revision or "main"
    commit: str | None = revision if REGEX_COMMIT_HASH.fullmatch(revision) else None
    ref = root / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    if not commit:
        return None
    snapshot = root / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


@dataclass(frozen=True)
class ModelNeeds:
    """What a run reads from a model repository."""

    config: bool = True
    weights: bool = True
    tokenizer: bool = False

    def patterns(self) -> list[str]:
        """``allow_patterns`` of these files (all at the repository root)."""
        out: list[str] = []
        for wanted, files in (
            (self.config, CONFIG_FILES),
            (self.weights, WEIGHT_FILES),
            (self.tokenizer, TOKENIZER_FILES),
        ):
            out += list(files) if wanted else []
        return out

    def describe(self) -> str:
        parts = [("config", self.config), ("safetensors weights", self.weights)]
        parts.append(("tokenizer + chat template", self.tokenizer))
        return ", ".join(name for name, wanted in parts if wanted)


def _missing_weights(snapshot: Path) -> list[str]:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (ValueError, KeyError, TypeError):
            return ["a readable model.safetensors.index.json"]
        return [s for s in shards if not (snapshot / s).is_file()]
    if any(p.is_file() for p in snapshot.glob("*.safetensors")):
        return []
    return ["safetensors weights (model.safetensors)"]


def missing_model_files(snapshot: Path, needs: ModelNeeds) -> list[str]:
    """What a run needs that ``snapshot`` lacks (a dangling link of an interrupted download
    counts as missing)."""
    missing = []
    if needs.config and not (snapshot / "config.json").is_file():
        missing.append("config.json")
    if needs.weights:
        missing += _missing_weights(snapshot)
    if needs.tokenizer and not any(
        (snapshot / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    return missing


def listed_but_missing(
    snapshot: Path,
    repo_id: str,
    repo_type: str,
    revision: str | None,
    cache_dir: str | None,
    allow: Sequence[str] | None,
    ignore: Sequence[str],
) -> list[str]:
    """Files of ``allow`` / ``ignore`` that the download's listing of the snapshot (``trees/``)
    names but ``snapshot`` lacks: an interrupted download. ``[]`` without a listing (a cache
    filled by ``from_pretrained``)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    try:
        tree = get_cached_repo_tree(
            repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir
        )
    except CachedRepoTreeNotFoundError:
        return []
    listed = filter_repo_objects(
        [f.path for f in tree],
        allow_patterns=list(allow) if allow is not None else None,
        ignore_patterns=list(ignore),
    )
    return [p for p in listed if not (snapshot / p).is_file()]


def _partly(snapshot: Path, missing: Sequence[str]) -> str:
    return f"is only partly in the local Hugging Face cache ({snapshot}: no {', '.join(missing)})"


def model_cache_problem(
    repo_id: str,
    needs: ModelNeeds,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str | None:
    """None when the cache holds what ``needs`` asks of ``repo_id``; else why not, as the end
    of a sentence (``is not in the local Hugging Face cache (...)``)."""
    cache = hub_cache_dir(cache_dir)
    snapshot = snapshot_dir(repo_id, "model", revision, cache_dir)
    if snapshot is None:
        return f"is not in the local Hugging Face cache ({cache})"
    missing = listed_but_missing(
        snapshot, repo_id, "model", revision, cache_dir, needs.patterns(), MODEL_IGNORE
    )
    missing += [m for m in missing_model_files(snapshot, needs) if m not in missing]
    if missing:
        return (
            f"is only partly in the local Hugging Face cache ({snapshot}: no {', '.join(missing)})"
        )
    return None


def dataset_cache_problem(
    repo_id: str,
    data_files: Sequence[str] = (),
    cache_dir: str | None = None,
    subsets: Sequence[str] = (),
    arrow_cache: bool = True,
) -> str | None:
    """None when the Hub cache holds a snapshot of dataset ``repo_id`` with what a run reads:
    a file for each of the ``data_files`` patterns, else the files of the ``subsets``
    (``config_name``) that its card declares, else the whole repository as the download's
    listing names it; else why not. Without a snapshot, a dataset that ``datasets`` prepared
    on an earlier online load (its Arrow cache, ``HF_DATASETS_CACHE`` or the source's
    ``cache_dir``) counts when ``arrow_cache``: the offline loader falls back to it."""
    snapshot = snapshot_dir(repo_id, "dataset")
    if snapshot is None:
        if arrow_cache and in_arrow_cache(repo_id, cache_dir):
            return None
        return f"is not in the local Hugging Face cache ({hub_cache_dir()})"
    patterns = list(data_files)
    for name in subsets:
        declared = card_data_files(snapshot, name)
        if declared is None:  # the card does not say: the whole repository is read
            patterns = []
            break
        patterns += data_file_patterns(*declared)
    allow = [*DATASET_METADATA, *patterns] if patterns else None
    missing = listed_but_missing(snapshot, repo_id, "dataset", None, None, allow, DATASET_IGNORE)
    missing += [p for p in patterns if not any(f.is_file() for f in snapshot.glob(p))]
    return _partly(snapshot, missing) if missing else None


def in_arrow_cache(repo_id: str, cache_dir: str | None = None) -> bool:
    """``datasets`` has prepared ``repo_id`` before (what it falls back to offline:
    ``<cache>/<org>___<name>/<config>/<version>/<hash>/``)."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return any(p.is_dir() for p in (root / "___".join(parts)).glob("*/*/*"))


def card_data_files(snapshot: Path, config_name: str) -> tuple[Any, str | None] | None:
    """``(data_files, data_dir)`` of subset ``config_name`` as the dataset card (README.md
    front matter, ``configs:``) declares them, or None when it does not."""
    readme = snapshot / "README.md"
    if not readme.is_file():
        return None
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data)
    params = configs.get(config_name)
    if not params or params.get("data_files") is None:
        return None
    return params["data_files"], params.get("data_dir")


def data_file_patterns(data_files: Any, data_dir: str | None = None) -> list[str]:
    """The path patterns of a ``data_files`` value (a pattern, a list, ``{split: ...}`` or the
    card's ``[{split, path}]``), relative to the repository root."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        found = [data_files]
    elif isinstance(data_files, Mapping):
        found = [p for v in data_files.values() for p in data_file_patterns(v)]
    else:
        found = []
        for item in data_files:
            value = item.get("path") if isinstance(item, Mapping) else item
            found += data_file_patterns(value)
    return [f"{data_dir.rstrip('/')}/{p}" if data_dir else p for p in found]


# ------------------------------------------------------------------------------ the Hub
def hub_error(err: BaseException, repo_id: str, repo_type: str = "model") -> str | None:
    """Why the Hub would not give ``repo_id``, as the end of a sentence; None for an error
    that is no Hub answer (a bug: the caller re-raises it)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = repo_url(repo_id, repo_type)
    if isinstance(err, GatedRepoError):
        return f"is gated on the Hugging Face Hub: accept its terms at {url} (hf auth login)"
    if isinstance(err, RepositoryNotFoundError):
        return f"is not on the Hugging Face Hub ({url}), or is private (log in: hf auth login)"
    if isinstance(err, RevisionNotFoundError):
        return f"has no such revision on the Hugging Face Hub ({url})"
    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot be fetched: downloads are off ({offline_flag()})"
    if isinstance(err, httpx2.TransportError | ConnectionError | TimeoutError):
        return (
            f"cannot be fetched: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            f"({type(err).__name__}); check the network, HF_ENDPOINT or the proxy"
        )
    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:
        return hub_error(err.__cause__, repo_id, repo_type)
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        return f"cannot be fetched: the Hugging Face Hub answered HTTP {status} ({url})"
    return None


def hub_access_problem(
    repo_id: str, repo_type: str = "model", revision: str | None = None
) -> str | None:
    """Online: None when the Hub knows ``repo_id`` (at ``revision``); else why not."""
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=20)
    except Exception as err:
        problem = hub_error(err, repo_id, repo_type)
        if problem is None:
            raise
        return problem
    return None


# ------------------------------------------------------------------------------ the fetch line
def hydra_choices() -> dict[str, str]:
    """The config group choices of the running Hydra job (``model``, ``dataset``, ...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v}


def _overridden(prefixes: Sequence[str]) -> bool:
    """A command-line override sets a key under one of ``prefixes``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    for override in HydraConfig.get().overrides.task:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if any(key == p or key.startswith(f"{p}.") for p in prefixes):
            return True
    return False


def fetch_command(args: Sequence[str]) -> str:
    return f"{ONLINE} {DOWNLOAD} {shlex.join(args)}"


def model_fetch_args(key: str, repo_id: str) -> list[str]:
    """The download's arguments for the model of config key ``key``: the model config the user
    chose (``model=qwen3-0.6b``) when the id is that config's, else the id itself."""
    choice = hydra_choices().get("model")
    paths = ("model.model_name_or_path", "model.tokenizer_name_or_path")
    if key in paths and choice and not _overridden(paths):
        return [f"model={choice}"]
    name = (
        "tokenizer_name_or_path" if key.endswith("tokenizer_name_or_path") else "model_name_or_path"
    )
    return [f"model.{name}={repo_id}"]


def dataset_fetch_args(where: str, repo_id: str, spec: Mapping[str, Any]) -> list[str]:
    """The download's arguments for the Hub dataset of ``where`` (``dataset.train``,
    ``evaluation.dataset.eval``, ...): the dataset config the user chose when its specs are
    not overridden, else the id (with its subset and data files)."""
    choices = hydra_choices()
    for root, group in (
        ("evaluation.dataset", "dataset@evaluation.dataset"),
        ("dataset", "dataset"),
    ):
        if where == root or where.startswith(f"{root}."):
            choice = choices.get(group)
            if choice and not _overridden((f"{root}.train", f"{root}.eval", f"{root}.train_path")):
                return [f"dataset={choice}"]
            break
    args = [f"dataset.train.path=hf:{repo_id}"]
    if spec.get("config_name"):
        args.append(f"dataset.train.config_name={spec['config_name']}")
    if isinstance(spec.get("data_files"), str):
        args.append(f"dataset.train.data_files={spec['data_files']}")
    return args


def not_cached_line(subject: str, problem: str, fetch_args: Sequence[str]) -> str:
    """``<subject> <problem> and downloads are off (HF_HUB_OFFLINE=1); fetch it once with:
    HF_HUB_OFFLINE=0 python -m post_training.download <args>``."""
    return (
        f"{subject} {problem} and downloads are off ({offline_flag()}); fetch it once with: "
        f"{fetch_command(fetch_args)}"
    )
