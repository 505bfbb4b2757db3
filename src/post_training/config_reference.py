"""Every config key of every entrypoint: type, default and one-line meaning, from the schemas.

    python -m post_training.config_reference [train_sft ...] [--markdown]

The defaults are those the entrypoint's YAML tree composes to (the schemas hold none of their
own); keys whose value depends on a group choice (``trainer=...``) show the default choice.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from post_training.schema import CONFIG_NAMES, SCHEMAS
from post_training.utils.config import CONFIGS_DIR, register_resolvers

PLACEHOLDER_OVERRIDES = {
    "evaluate": ["model_path=CHECKPOINT_DIR"],
    "model_merging": ["model_merging.base_model=BASE_DIR", "model_merging.models=[MODEL_DIR]"],
}


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _model_of(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The section schema of a field (the union member that ``value`` selects)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if value is None or typing.get_origin(annotation) in (list, dict):
        return None  # a null section or a list of sections: one row
    candidates = typing.get_args(annotation) or (annotation,)
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    if len(models) > 1 and isinstance(value, Mapping):
        for model in models:
            name = model.model_fields.get("name")
            if name is not None and value.get("name") in typing.get_args(name.annotation):
                return model
    return models[0] if models else None


def rows(
    schema: type[BaseModel], values: Mapping[str, Any], prefix: str = ""
) -> Iterator[tuple[str, str, Any, str]]:
    """``(key, type, default, meaning)`` for every leaf key of ``schema``."""
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        value = values.get(name) if isinstance(values, Mapping) else None
        section = _model_of(field.annotation, value)
        if section is not None and section.model_config.get("extra") == "forbid":
            yield from rows(section, value or {}, key + ".")
        else:
            yield key, type_name(field.annotation), value, field.description or ""


def trainer_choices(schema: type[BaseModel]) -> list[str]:
    """The ``trainer=<name>`` choices of an entrypoint's schema (none without a trainer)."""
    field = schema.model_fields.get("trainer")
    if field is None:
        return []
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    members = typing.get_args(annotation) or (annotation,)
    return [typing.get_args(m.model_fields["name"].annotation)[0] for m in members]


def composed_defaults(entrypoint: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The default config of an entrypoint as Hydra composes it (interpolations kept)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        cfg = compose(
            CONFIG_NAMES[entrypoint],
            overrides=[*PLACEHOLDER_OVERRIDES.get(entrypoint, []), *overrides],
        )
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def render(entrypoint: str, markdown: bool) -> str:
    schema = SCHEMAS[entrypoint]
    defaults = composed_defaults(entrypoint)
    table = list(rows(schema, defaults))
    for choice in trainer_choices(schema):  # every trainer's own keys, not just the default's
        if choice == defaults["trainer"]["name"]:
            continue
        other = composed_defaults(entrypoint, (f"trainer={choice}",))
        table += [
            (k, t, d, f"[trainer={choice}] {m}")
            for k, t, d, m in rows(schema, other)
            if k.startswith("trainer.")
        ]
    if markdown:
        out = [f"### `{entrypoint}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{k}` | `{t}` | `{d!r}` | {m} |" for k, t, d, m in table]
        return "\n".join(out) + "\n"
    width = max(len(k) for k, *_ in table)
    out = [f"# {entrypoint} (configs/{CONFIG_NAMES[entrypoint]}.yaml)"]
    out += [f"{k:<{width}}  {t}  = {d!r}\n{'':<{width}}  {m}" for k, t, d, m in table]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entrypoints", nargs="*", choices=[[], *SCHEMAS], default=[])
    parser.add_argument("--markdown", action="store_true", help="Markdown tables")
    args = parser.parse_args(argv)
    for entrypoint in args.entrypoints or list(SCHEMAS):
        sys.stdout.write(render(entrypoint, args.markdown) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
