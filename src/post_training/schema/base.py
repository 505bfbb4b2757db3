"""The schema machinery: strict sections, one-line errors, and validation of a composed config.

Why pydantic (v2) rather than Hydra structured configs: the configs hold unions that structured
configs cannot express (a dataset split is a source, a mixture or ``{from_train: ...}``; a
trainer section is one of several schemas chosen by ``trainer.name``), and the rules that matter
most are ranges and cross-field rules (exactly one training length; ``num_training_tokens``
needs packing), which pydantic states next to the field and reports with the key's location.
Hydra still composes the YAML tree (defaults, groups, overrides, ``--cfg job``); the composed
config is validated once, right after composition and before anything is written.

Defaults live in one place. The YAML tree is the single source of every default value: a schema
field has no default of its own (a key the composed config lacks is an error), so the two cannot
disagree. ``python -m post_training.config_reference`` prints every key of an entrypoint with
its type, the default its YAML tree composes to, and the field's one-line meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from post_training.errors import ConfigError

S = TypeVar("S", bound=BaseModel)


class Section(BaseModel):
    """A config section: unknown keys are refused, attributes are typed and read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class OpenSection(BaseModel):
    """A section whose keys belong to another tool (e.g. an accelerate launch file)."""

    model_config = ConfigDict(extra="allow", frozen=True)


def _walk(data: Any, loc: tuple[Any, ...]) -> tuple[str, bool, Any]:
    """The dotted key of a pydantic error location and the user's value there (``found`` is
    False when absent). Union-member and discriminator tags that pydantic inserts into the
    location (``trainer.plw.plw_args``) are not part of the user's key and are skipped."""
    parts: list[str] = []
    value, found = data, True
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            if found and isinstance(value, list | tuple) and item < len(value):
                value = value[item]
            else:
                found = False
            continue
        if found and isinstance(value, Mapping) and item in value:
            value = value[item]
        elif found and isinstance(value, Mapping) and value.get("name") == item:
            continue  # discriminator tag
        elif item.startswith("function-") or "[" in item:
            continue  # union member / validator tag
        else:
            found = False
        parts.append(("." if parts else "") + item)
    return "".join(parts), found, value


def _rule(error: Mapping[str, Any]) -> str:
    kind, msg = error["type"], str(error["msg"])
    if kind == "missing":
        return "is required (the YAML tree must set it)"
    if kind == "union_tag_invalid":
        return f"must be one of {error['ctx']['expected_tags']} here"
    if kind == "extra_forbidden":
        return "is not a key of this config (remove it, or check its spelling)"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = msg.replace("Input should be", "must be").replace("input should be", "must be")
    return msg[0].lower() + msg[1:] if msg else kind


def error_lines(error: ValidationError, data: Any, root: str = "") -> list[str]:
    """One line per problem: ``key=value: rule``."""
    lines = []
    seen: set[str] = set()
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "union_tag_invalid":  # the tag is the discriminator's value
            loc = (*loc, item["ctx"]["discriminator"].strip("'"))
        key, found, value = _walk(data, loc)
        full = f"{root}.{key}" if root and key else (root or key or "<config>")
        if item["type"] == "extra_forbidden" or not found or isinstance(value, Mapping):
            line = f"{full}: {_rule(item)}"
        else:
            line = f"{full}={value!r}: {_rule(item)}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def validate(schema: type[S], data: Mapping[str, Any], root: str = "") -> S:
    """``data`` (a plain, resolved mapping) as the typed ``schema``; a :class:`ConfigError`
    listing every problem, one line each, when it does not fit."""
    try:
        return schema.model_validate(dict(data))
    except ValidationError as error:
        lines = error_lines(error, data, root)
        head = "invalid config" if len(lines) > 1 else "invalid config:"
        if len(lines) == 1:
            raise ConfigError(f"{head} {lines[0]}") from None
        raise ConfigError(head + "\n" + "\n".join(f"  {line}" for line in lines)) from None
