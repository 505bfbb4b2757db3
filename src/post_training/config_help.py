"""``<entrypoint> --help``: the config groups and the choices this entrypoint accepts.

Hydra's own listing shows every group of the config dir to every entrypoint (``train_sft
--help`` offered the ``dpo`` and ``qrpo`` trainers, which ``train_sft`` refuses, and the model
merging methods). The help template of ``setup.yaml`` calls :func:`config_groups` through the
``pt.config_groups`` resolver instead: the groups of the entrypoint's own defaults list, and for
a group whose schema field is a union discriminated by ``name`` (``trainer``), only the names that
the schema accepts.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from post_training.schema.entrypoints import CONFIG_NAMES, SCHEMAS
from post_training.utils.config import CONFIGS_DIR


def _default_groups(entrypoint: str) -> list[str]:
    """The config groups in the defaults list of ``entrypoint``'s primary config, in order."""
    primary = CONFIGS_DIR / f"{CONFIG_NAMES[entrypoint]}.yaml"
    defaults = yaml.safe_load(primary.read_text(encoding="utf-8")).get("defaults") or []
    groups: list[str] = []
    for item in defaults:
        if not isinstance(item, dict):
            continue  # "setup", "_self_": configs, not groups
        for key in item:
            group = key.removeprefix("optional ").split("@")[0].strip()
            if group not in groups and (CONFIGS_DIR / group).is_dir():
                groups.append(group)
    return groups


def _accepted_names(schema: Any, group: str) -> set[str] | None:
    """The ``name`` values the schema field ``group`` accepts, when it is a union of sections
    told apart by a literal ``name`` (None: any option of the group)."""
    field = getattr(schema, "model_fields", {}).get(group)
    if field is None:
        return None
    members = typing.get_args(field.annotation) or (field.annotation,)
    names: set[str] = set()
    for member in members:
        name_field = getattr(member, "model_fields", {}).get("name")
        literals = typing.get_args(name_field.annotation) if name_field is not None else ()
        if not literals:
            return None
        names.update(str(v) for v in literals)
    return names


def _options(group: str) -> list[str]:
    root = CONFIGS_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def config_groups(entrypoint: str) -> str:
    """``group: choice, choice, ...`` lines for ``entrypoint`` (see the module docstring)."""
    if entrypoint not in CONFIG_NAMES:
        return ""
    lines = []
    for group in _default_groups(entrypoint):
        options = _options(group)
        accepted = _accepted_names(SCHEMAS.get(entrypoint), group)
        if accepted is not None:
            options = [o for o in options if Path(o).name in accepted]
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)
