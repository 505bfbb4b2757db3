"""Config helpers: OmegaConf resolvers, validation, hashing and diffs of resolved configs.

Importing this module registers the ``pt.*`` resolvers used by the YAML tree, so every
entrypoint imports it before ``@hydra.main`` composes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIGS_DIR = PACKAGE_DIR / "configs"
ARTIFACTS_ENV_VAR = "POST_TRAINING_ARTIFACTS_DIR"


def default_artifacts_dir() -> str:
    """``$POST_TRAINING_ARTIFACTS_DIR``, else ``<repo>/artifacts``, else ``./artifacts``."""
    if os.environ.get(ARTIFACTS_ENV_VAR):
        return str(Path(os.environ[ARTIFACTS_ENV_VAR]).resolve())
    repo_artifacts = PACKAGE_DIR.parents[1] / "artifacts"
    if (PACKAGE_DIR.parents[1] / "pyproject.toml").exists():
        return str(repo_artifacts)
    return str(Path.cwd() / "artifacts")


def asset_path(relative: str) -> str:
    """Absolute path of a file shipped in ``post_training/assets``."""
    return str(ASSETS_DIR / relative)


def _select(condition: Any, if_true: Any, if_false: Any) -> Any:
    return if_true if bool(condition) else if_false


def register_resolvers() -> None:
    """Register the ``pt.*`` resolvers (idempotent)."""
    for name, fn in {
        "pt.artifacts_dir": default_artifacts_dir,
        "pt.asset": asset_path,
        "pt.select": _select,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict copy of a config."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def drop_keys(flat: Mapping[str, Any], ignore_keys: Iterable[str]) -> dict[str, Any]:
    """Drop dotted keys equal to, or nested under, any of ``ignore_keys``."""
    ignore = tuple(ignore_keys)
    return {
        k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)
    }


def config_hash(resolved: Mapping[str, Any], ignore_keys: Iterable[str]) -> str:
    """Stable short hash of a resolved config minus the ignored keys."""
    kept = drop_keys(flatten(resolved), ignore_keys)
    payload = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def diff_configs(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore_keys: Iterable[str]
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ (missing = ``<absent>``), ignored keys excluded."""
    a = drop_keys(flatten(old), ignore_keys)
    b = drop_keys(flatten(new), ignore_keys)
    absent = "<absent>"
    return {
        k: (a.get(k, absent), b.get(k, absent))
        for k in sorted(set(a) | set(b))
        if a.get(k, absent) != b.get(k, absent)
    }
