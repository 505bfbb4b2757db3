"""Typed schemas of every entrypoint's config, validated right after Hydra composes it.

``check(cfg)`` returns the typed config of the entrypoint ``cfg.entrypoint`` names, or raises
one :class:`~post_training.errors.ConfigError` whose lines each name a key, its value and the
rule it breaks. See :mod:`post_training.schema.base` for why pydantic and where defaults live.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from post_training.errors import ConfigError
from post_training.schema.base import Section, validate
from post_training.schema.entrypoints import CONFIG_NAMES, SCHEMAS, TrainPreference, TrainSFT
from post_training.schema.sections import Setup


def check(resolved: Mapping[str, Any]) -> Setup:
    """The typed config of a resolved (plain) composed config."""
    entrypoint = resolved.get("entrypoint")
    if entrypoint not in SCHEMAS:
        raise ConfigError(f"entrypoint={entrypoint!r}: no schema; known: {sorted(SCHEMAS)}")
    return validate(SCHEMAS[entrypoint], resolved)


__all__ = [
    "CONFIG_NAMES",
    "SCHEMAS",
    "Section",
    "Setup",
    "TrainPreference",
    "TrainSFT",
    "check",
    "validate",
]
