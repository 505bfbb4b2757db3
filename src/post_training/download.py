"""Fetch, once, what an offline run of a model and / or a dataset config reads from the Hub.

    HF_HUB_OFFLINE=0 python -m post_training.download model=qwen3-0.6b dataset=alpaca
    python -m post_training.download model=qwen3-0.6b dry_run=true   # what and where; no network

Runs are offline by default (``HF_HUB_OFFLINE=1``, which ``post_training`` sets unless the user
set it); this entrypoint is the one step that needs the network. It puts into the normal Hub
cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``), where the offline run then finds them:

* the model of ``model=<config>`` (or ``model.model_name_or_path=<Hub id>``): ``config.json``,
  the tokenizer files and chat template, and the safetensors weights (never ``*.bin`` /
  ``*.pth`` / ``*.gguf`` / optimizer states or subfolders: the trainers load safetensors only;
  no weights for an ``init_from_config`` model); the tokenizer's repository too when
  ``tokenizer_name_or_path`` is another one;
* the Hub repository of every source of ``dataset=<config>`` (train and eval, mixtures
  included; or ``dataset.train.path=hf:<Hub id>``), restricted to its ``data_files`` or to the
  files of its subset (``config_name``, read from the dataset card) when the spec names them.

``revision`` picks a branch, tag or commit of the model (training reads the cached ``main``: the
command printed at the end then points ``model.model_name_or_path`` at the snapshot). Nothing
fetched is executed (no ``*.py``: remote code is never loaded). ``dry_run=true`` prints what would
be fetched and where, reading only the local cache. With downloads off, a run whose files are
all cached already reports them; otherwise it stops with one line giving the command with
``HF_HUB_OFFLINE=0``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from post_training.data_sft.hub_datasets import hub_sources
from post_training.errors import ConfigError
from post_training.frame import entrypoint
from post_training.utils import hub_cache
from post_training.utils.config import to_container
from post_training.utils.hub_cache import ModelNeeds

DOWNLOAD_KEYS = ("revision", "dry_run")
"""Keys of this entrypoint only (left out of the training command it prints)."""
SOURCE_OPTION_KEYS = ("dataset.train.config_name=", "dataset.train.data_files=")


@dataclass
class Fetch:
    """One Hub repository to fetch, and the config keys that read it."""

    repo_id: str
    repo_type: str  # model | dataset
    keys: list[str]
    revision: str | None = None
    needs: ModelNeeds | None = None  # a model repository: which of its files
    data_files: list[str] = field(default_factory=list)  # dataset: the specs' patterns
    subsets: list[str] = field(default_factory=list)  # dataset: config_name, files from the card
    whole: bool = False  # dataset: a spec reads the whole repository

    @property
    def ignore(self) -> list[str]:
        return list(
            hub_cache.MODEL_IGNORE if self.repo_type == "model" else hub_cache.DATASET_IGNORE
        )

    def allow(self, snapshot: Path | None = None) -> list[str] | None:
        """``allow_patterns`` (None: every file). A subset's files come from the dataset card
        in ``snapshot``; without one (a dry run), only the card itself is listed."""
        if self.needs is not None:
            return self.needs.patterns()
        if self.whole:
            return None
        patterns = list(hub_cache.DATASET_METADATA) + self.data_files
        for name in self.subsets:
            declared = hub_cache.card_data_files(snapshot, name) if snapshot else None
            if snapshot is not None and declared is None:
                return None  # the card does not say: the whole repository
            patterns += hub_cache.data_file_patterns(*declared) if declared else []
        return list(dict.fromkeys(patterns))

    def what(self) -> str:
        if self.needs is not None:
            return self.needs.describe()
        if self.whole:
            return "every file"
        parts = [f"data files {', '.join(self.data_files)}"] if self.data_files else []
        parts += [f"the files of subset {name!r} (from its card)" for name in self.subsets]
        return "the card and " + ", ".join(parts)

    def cache_problem(self) -> str | None:
        """None when the cache already holds what the run reads (read locally)."""
        if self.needs is not None:
            return hub_cache.model_cache_problem(self.repo_id, self.needs, self.revision)
        if self.whole:
            return hub_cache.dataset_cache_problem(self.repo_id, arrow_cache=False)
        return hub_cache.dataset_cache_problem(
            self.repo_id, self.data_files, subsets=self.subsets, arrow_cache=False
        )


# ------------------------------------------------------------------------------ the plan
def _model_fetches(model_cfg: dict[str, Any], revision: str | None) -> list[Fetch]:
    model = model_cfg.get("model_name_or_path")
    tokenizer = model_cfg.get("tokenizer_name_or_path")
    weights = not model_cfg.get("init_from_config")
    wanted = []
    if model:
        needs = ModelNeeds(config=True, weights=weights, tokenizer=model == tokenizer)
        keys = ["model.model_name_or_path"]
        keys += ["model.tokenizer_name_or_path"] if model == tokenizer else []
        wanted.append((str(model), keys, needs))
    if tokenizer and tokenizer != model:
        needs = ModelNeeds(config=False, weights=False, tokenizer=True)
        wanted.append((str(tokenizer), ["model.tokenizer_name_or_path"], needs))
    fetches = []
    for value, keys, needs in wanted:
        if Path(value).expanduser().is_dir():
            print(f"{keys[0]}={value!r} is a local directory: nothing to fetch")
            continue
        if not hub_cache.is_hub_id(value):
            raise ConfigError(f"{keys[0]}={value!r}: no such directory, and no Hub id (org/name)")
        fetches.append(Fetch(value, "model", keys, revision=revision, needs=needs))
    return fetches


def _dataset_fetches(dataset_cfg: dict[str, Any] | None) -> list[Fetch]:
    by_repo: dict[str, Fetch] = {}
    for source in hub_sources(dataset_cfg, "dataset"):
        fetch = by_repo.setdefault(source.repo_id, Fetch(source.repo_id, "dataset", []))
        fetch.keys.append(source.where)
        if source.data_files:
            fetch.data_files += [p for p in source.data_files if p not in fetch.data_files]
        elif source.spec.get("config_name"):
            fetch.subsets.append(str(source.spec["config_name"]))
        else:
            fetch.whole = True
    return list(by_repo.values())


def plan(config: dict[str, Any]) -> list[Fetch]:
    """The repositories that the ``model`` and ``dataset`` sections read from the Hub."""
    fetches = _model_fetches(config.get("model") or {}, config.get("revision"))
    return fetches + _dataset_fetches(config.get("dataset"))


# ------------------------------------------------------------------------------ fetching
def _size(snapshot: Path) -> str:
    total = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1000
    return ""


def _fail(fetch: Fetch, err: BaseException) -> ConfigError:
    problem = hub_cache.hub_error(err, fetch.repo_id, fetch.repo_type)
    if problem is None:
        raise err
    kind = "Hub dataset" if fetch.repo_type == "dataset" else "model"
    return ConfigError(f"{', '.join(fetch.keys)}: the {kind} {fetch.repo_id!r} {problem}")


def _check_weights(fetch: Fetch) -> None:
    """A model without safetensors weights (only ``*.bin``, say) cannot be trained: say so
    before fetching anything."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(fetch.repo_id, revision=fetch.revision, timeout=30)
    names = [s.rfilename for s in info.siblings or []]
    chosen = list(
        filter_repo_objects(names, allow_patterns=fetch.allow(), ignore_patterns=fetch.ignore)
    )
    if fetch.needs and fetch.needs.weights and not any(n.endswith(".safetensors") for n in chosen):
        others = [n for n in names if n.endswith((".bin", ".pth", ".pt", ".gguf"))][:3]
        raise ConfigError(
            f"{fetch.keys[0]}={fetch.repo_id!r} has no safetensors weights on the Hub"
            + (f" (only {', '.join(others)})" if others else "")
            + ": the trainers load safetensors only"
        )


def fetch_one(fetch: Fetch) -> Path:
    """Download ``fetch`` into the Hub cache; the snapshot directory."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        snapshot = None
        if fetch.repo_type == "model":
            _check_weights(fetch)
        elif fetch.subsets and not fetch.whole:
            card = hf_hub_download(fetch.repo_id, "README.md", repo_type="dataset")
            snapshot = Path(card).parent
        path = snapshot_download(
            fetch.repo_id,
            repo_type=fetch.repo_type,
            revision=fetch.revision,
            allow_patterns=fetch.allow(snapshot),
            ignore_patterns=fetch.ignore,
        )
    except ConfigError:
        raise
    except Exception as err:
        raise _fail(fetch, err) from err
    problem = fetch.cache_problem()
    if problem is not None:
        raise ConfigError(
            f"{', '.join(fetch.keys)}: {fetch.repo_id!r} {problem} after the download"
        )
    return Path(path)


# ------------------------------------------------------------------------------ the report
def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def _train_entrypoint(config: dict[str, Any]) -> str:
    from post_training.data_preference.transforms import PREFERENCE_TRANSFORMS

    train = ((config.get("dataset") or {}).get("train")) or {}
    specs = train.get("sources") or [train]
    preference = any(
        isinstance(s, dict) and s.get("transform") in PREFERENCE_TRANSFORMS for s in specs
    )
    return "train_preference" if preference else "train_sft"


def train_command(config: dict[str, Any], snapshots: dict[str, Path]) -> str:
    """The offline training command that reads what was fetched (``snapshots``: the model
    snapshot per key, when a non-default revision was fetched)."""
    args = [o for o in _overrides() if o.split("=", 1)[0].lstrip("+~") not in DOWNLOAD_KEYS]
    # keys a training dataset config may lack: added or overridden
    args = [f"++{a}" if a.startswith(SOURCE_OPTION_KEYS) else a for a in args]
    for key, path in snapshots.items():
        args = [a for a in args if not a.lstrip("+~").startswith(f"{key}=")]
        args.append(f"{key}={path}")
    env = [
        f"{k}={shlex.quote(os.environ[k])}"
        for k in ("HF_HOME", "HF_HUB_CACHE")
        if os.environ.get(k)
    ]
    return " ".join(
        [*env, f"python -m post_training.{_train_entrypoint(config)}", shlex.join(args)]
    )


def _revision_snapshots(fetches: Sequence[Fetch], done: dict[int, Path]) -> dict[str, Path]:
    """Training reads ``main``: a model fetched at another revision is given by its path."""
    out = {}
    for i, fetch in enumerate(fetches):
        if fetch.repo_type == "model" and fetch.revision and i in done:
            out.update({key: done[i] for key in fetch.keys})
    return out


def print_plan(fetches: Sequence[Fetch]) -> None:
    cache = hub_cache.hub_cache_dir()
    print(f"dry run: nothing is fetched and the network is not used; the Hub cache is {cache}")
    for fetch in fetches:
        card = hub_cache.snapshot_dir(fetch.repo_id, "dataset") if fetch.subsets else None
        allow = fetch.allow(card)  # a subset's files: from its card, once that is cached
        revision, keys = fetch.revision or "main", ", ".join(fetch.keys)
        print(f"{fetch.repo_type} {fetch.repo_id} (revision {revision}) for {keys}")
        print(f"  files:   {fetch.what()}")
        print(f"  allow:   {' '.join(allow) if allow is not None else '* (every file)'}")
        print(f"  ignore:  {' '.join(fetch.ignore)}")
        print(f"  into:    {hub_cache.repo_dir(fetch.repo_id, fetch.repo_type)}")
        problem = fetch.cache_problem()
        print(f"  cached:  {'yes, complete' if problem is None else 'no: it ' + problem}")
    if hub_cache.offline():
        args = [o for o in _overrides() if o.split("=", 1)[0].lstrip("+~") != "dry_run"]
        flag, command = hub_cache.offline_flag(), hub_cache.fetch_command(args)
        print(f"downloads are off ({flag}): fetch with {command}")


def run(cfg: DictConfig) -> int:
    config = to_container(cfg)
    fetches = plan(config)
    named = (config.get("model") or {}).get("model_name_or_path") or (
        config.get("dataset") or {}
    ).get("name")
    if not fetches and named:
        print("nothing to fetch: the model and dataset are local files, read offline as they are")
        return 0
    if not fetches:
        raise ConfigError(
            "download: nothing to fetch from the Hub: give model=<model config> and/or "
            "dataset=<dataset config> (or model.model_name_or_path=<Hub id>, "
            "dataset.train.path=hf:<Hub id>)"
        )
    if config["dry_run"]:
        print_plan(fetches)
        return 0
    done: dict[int, Path] = {}
    if hub_cache.offline():
        missing = [f for f in fetches if f.cache_problem() is not None]
        if missing:
            raise ConfigError(
                f"downloads are off ({hub_cache.offline_flag()}, post_training's default) and "
                f"{missing[0].repo_id!r} is not in the local cache: run "
                f"{hub_cache.fetch_command(_overrides())}"
            )
        print("downloads are off, but everything is in the local cache already")
        for i, fetch in enumerate(fetches):
            done[i] = hub_cache.snapshot_dir(fetch.repo_id, fetch.repo_type, fetch.revision)  # type: ignore[assignment]
    for i, fetch in enumerate(fetches):
        if i not in done:
            done[i] = fetch_one(fetch)
        keys, size = ", ".join(fetch.keys), _size(done[i])
        print(f"{keys}: {fetch.repo_id} ({fetch.what()}, {size}) in {done[i]}")
    snapshots = _revision_snapshots(fetches, done)
    print(f"Everything is in {hub_cache.hub_cache_dir()}. Train offline (the default) with:")
    print(f"  {train_command(config, snapshots)}")
    return 0


main = entrypoint("download", validated_by_run=True)(run)


if __name__ == "__main__":
    main()
