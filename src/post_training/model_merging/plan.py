"""A merge, planned and described: validate a ``model-merging`` config against the checkpoints on
disk (:func:`validate` -> :class:`MergePlan`; nothing is written before this passes), turn it into
mergekit's configuration and options, and describe its inputs in a manifest (paths, sha256 of
their weight files). :mod:`post_training.merge` runs it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from post_training.errors import ConfigError

CONFIG_FILE = "merge_config.yaml"  # the resolved Hydra config of the run
MANIFEST_FILE = "merge_manifest.json"  # inputs (paths, weight hashes), parameters, versions
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")
KEY = "model_merging"

# Value ranges mergekit does not check itself: name -> (predicate, description).
_RANGES = {
    "density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "t": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


@dataclass(frozen=True)
class InputModel:
    """One checkpoint to merge."""

    key: str  # config key it comes from, for error messages
    given: str  # as written in the config
    path: Path  # resolved local directory
    parameters: dict[str, Any] = field(default_factory=dict)  # per-model mergekit parameters


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: everything mergekit needs, checked against the checkpoints on disk."""

    method: str
    base: InputModel | None
    models: tuple[InputModel, ...]
    parameters: dict[str, Any]  # method-level mergekit parameters
    dtype: str
    out_dtype: str | None
    output_dir: Path
    base_is_ignored: bool  # the method merges all models symmetrically (linear, ...)


# --- Validation -------------------------------------------------------------------------------


def method_spec(name: str) -> Any:
    """mergekit's ``MergeMethodSpec`` of a method name (parameters and input contract)."""
    from mergekit import merge_methods

    try:
        return merge_methods.get(str(name)).spec
    except RuntimeError:
        known = sorted(m.spec.name for m in merge_methods.registered_methods())
        raise ConfigError(
            f"{KEY}.method: unknown merge method {name!r}; mergekit {version('mergekit')} "
            f"knows {known}"
        ) from None


def _check_setting(spec: Any, value: Any, key: str) -> None:
    """A parameter value: a scalar, a list (a gradient over layers) or ``{filter, value}``."""
    if isinstance(value, Mapping):
        if set(value) - {"filter", "value"} or "value" not in value:
            raise ConfigError(f"{key}: a conditional value is {{filter: <name>, value: <v>}}")
        _check_setting(spec, value["value"], key)
        return
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: empty list")
        for i, item in enumerate(value):
            _check_setting(spec, item, f"{key}[{i}]")
        return
    if value is None:
        raise ConfigError(f"{key}: null is not a value of {spec.name}")
    try:
        checked = spec.validate(value)
    except ValueError as err:  # pydantic's ValidationError
        raise ConfigError(f"{key}={value!r}: not a valid {spec.value_type.__name__}") from err
    if spec.name in _RANGES and isinstance(checked, (int, float)):
        predicate, description = _RANGES[spec.name]
        if not predicate(checked):
            raise ConfigError(f"{key}={checked!r}: {spec.name} must be {description}")


def method_parameters(spec: Any, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the method-level parameters (``model_merging.parameters``) against the method."""
    given = dict(given or {})
    shared = {p.name: p for p in spec.shared_parameters}
    per_model = {p.name for p in spec.input_parameters}
    for name, value in given.items():
        key = f"{KEY}.parameters.{name}"
        if name in per_model:
            raise ConfigError(
                f"{key}: {name} is a per-model parameter of {spec.name}; set "
                f"{KEY}.model_parameters.{name} or {KEY}.models[i].{name}"
            )
        if name not in shared:
            raise ConfigError(
                f"{key}: {spec.name} has no method-level parameter {name!r}; it takes "
                f"{sorted(shared)}"
            )
        _check_setting(shared[name], value, key)
    for name, p in shared.items():
        if p.required and name not in given:
            raise ConfigError(f"{KEY}.parameters.{name}: required by {spec.name}")
    return given


def split_model_entries(entries: Any) -> list[tuple[str, dict[str, Any]]]:
    """``models``: ``[dir, ...]`` or ``[{path: dir, <param>: value}, ...]`` -> (path, params)."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{KEY}.models: a non-empty list of checkpoint dirs (or {{path: dir, ...}} mappings), "
            f"got {entries!r}"
        )
    split = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str) and entry:
            split.append((entry, {}))
        elif isinstance(entry, Mapping) and isinstance(entry.get("path"), str) and entry["path"]:
            split.append((entry["path"], {k: v for k, v in entry.items() if k != "path"}))
        else:
            raise ConfigError(f"{KEY}.models[{i}]: expected a path or {{path: dir, ...}}")
    return split


def per_model_parameters(
    spec: Any, entries: Sequence[dict[str, Any]], defaults: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Each model's parameters: its own entry, else ``model_parameters`` (one value for all, or a
    list with one value per model), else mergekit's default."""
    params = {p.name: p for p in spec.input_parameters}
    defaults = dict(defaults or {})
    n = len(entries)
    for name, value in defaults.items():
        key = f"{KEY}.model_parameters.{name}"
        if name not in params:
            raise ConfigError(
                f"{key}: {spec.name} has no per-model parameter {name!r}; it takes {sorted(params)}"
            )
        if isinstance(value, list) and len(value) != n:
            raise ConfigError(
                f"{key}: {len(value)} values for {n} models in {KEY}.models; give one value per "
                "model, or a single value for all"
            )
    resolved = []
    for i, own in enumerate(entries):
        values: dict[str, Any] = {}
        for name, p in params.items():
            key = f"{KEY}.models[{i}].{name}"
            if name in own:
                value = own[name]
            elif defaults.get(name) is not None:
                value = defaults[name]
                value = value[i] if isinstance(value, list) else value
                key = f"{KEY}.model_parameters.{name}" + (
                    f"[{i}]" if isinstance(defaults[name], list) else ""
                )
            elif p.required:
                raise ConfigError(
                    f"{key}: {spec.name} needs a {name} for every model; set it there or in "
                    f"{KEY}.model_parameters.{name}"
                )
            else:
                continue
            _check_setting(p, value, key)
            values[name] = value
        unknown = set(own) - set(params)
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(
                f"{KEY}.models[{i}].{name}: {spec.name} has no per-model parameter {name!r}; "
                f"it takes {sorted(params)}"
            )
        resolved.append(values)
    return resolved


def resolve_model_dir(value: str, key: str) -> Path:
    """A local checkpoint dir, or a hub id already in the local Hugging Face cache (offline)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_like_repo_id = value.count("/") == 1 and not value.startswith((".", "/", "~"))
    if looks_like_repo_id and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(value, local_files_only=True))
        except Exception:  # not cached (or not a valid repo id): fall through to the error
            pass
    raise ConfigError(
        f"{key}={value!r}: no such checkpoint directory"
        + (" (nor a model in the local Hugging Face cache)" if looks_like_repo_id else "")
    )


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: safetensors, else pickled ``pytorch_model*.bin``."""
    files = sorted(model_dir.glob("*.safetensors"))
    return files or sorted(model_dir.glob("pytorch_model*.bin"))


def read_checkpoint(model_dir: Path, key: str) -> tuple[dict[str, Any], list[Path]]:
    """``config.json`` and weight files of a checkpoint, or a ConfigError naming ``key``."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}={str(model_dir)!r}: no config.json (not a model checkpoint)")
    files = weight_files(model_dir)
    if not files:
        raise ConfigError(
            f"{key}={str(model_dir)!r}: no weights (*.safetensors or pytorch_model*.bin)"
        )
    return json.loads(config_file.read_text()), files


def tensor_shapes(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def check_compatible(models: Sequence[InputModel]) -> None:
    """Every model has the architecture and tensor shapes of the first (the base, if any)."""
    ref = models[0]
    ref_config, ref_files = read_checkpoint(ref.path, ref.key)
    ref_arch = (ref_config.get("model_type"), ref_config.get("architectures"))
    ref_shapes = tensor_shapes(ref_files)
    for other in models[1:]:
        config, files = read_checkpoint(other.path, other.key)
        arch = (config.get("model_type"), config.get("architectures"))
        if arch != ref_arch:
            raise ConfigError(
                f"{other.key}={other.given!r}: architecture {arch[1]} (model_type {arch[0]!r}) "
                f"differs from {ref.key}={ref.given!r}: {ref_arch[1]} (model_type "
                f"{ref_arch[0]!r}); only checkpoints of one architecture can be merged"
            )
        shapes = tensor_shapes(files)
        differing = [
            f"{name} {shapes.get(name, 'absent')} vs {ref_shapes.get(name, 'absent')}"
            for name in sorted(set(shapes) | set(ref_shapes))
            if shapes.get(name) != ref_shapes.get(name)
        ]
        if differing:
            raise ConfigError(
                f"{other.key}={other.given!r}: tensor shapes differ from {ref.key}={ref.given!r} "
                f"({len(differing)} tensors, e.g. {'; '.join(differing[:3])})"
            )


def check_output_dir(output_dir: Path, overwrite: bool, inputs: Sequence[InputModel]) -> None:
    """Refuse to write over an input, or over an existing dir without ``overwrite=true``."""
    for model in inputs:
        if model.path == output_dir or output_dir in model.path.parents:
            raise ConfigError(
                f"output_dir={str(output_dir)!r} would replace the input "
                f"{model.key}={model.given!r}"
            )
    if not output_dir.exists():
        return
    if not overwrite:
        raise ConfigError(
            f"output_dir={str(output_dir)!r} already exists; set overwrite=true to replace it, "
            "or choose another name=/output_dir="
        )
    if any(output_dir.iterdir()) and not (output_dir / MANIFEST_FILE).is_file():
        raise ConfigError(
            f"output_dir={str(output_dir)!r} is not empty and holds no {MANIFEST_FILE} (not a "
            "merge output); refusing to replace it even with overwrite=true"
        )


def validate(cfg: Mapping[str, Any]) -> MergePlan:
    """Check the resolved config and the checkpoints it names (reads only); raises ConfigError."""
    mm = cfg[KEY]
    spec = method_spec(mm["method"])
    for name in ("dtype", "out_dtype"):
        if cfg[name] not in DTYPES and not (name == "out_dtype" and cfg[name] is None):
            raise ConfigError(f"{name}={cfg[name]!r}: one of {list(DTYPES)}")
    if str(cfg["device"]).split(":")[0] not in DEVICES:
        raise ConfigError(f"device={cfg['device']!r}: one of {list(DEVICES)} (cuda:<i> allowed)")

    from mergekit.merge_methods import BasePolicy

    policy = spec.contract.base
    base_is_ignored = policy == BasePolicy.IGNORED
    if mm.get("base_model") and policy in (BasePolicy.IGNORED, BasePolicy.FORBIDDEN):
        raise ConfigError(
            f"{KEY}.base_model: {spec.name} merges the listed models symmetrically and takes no "
            f"base model; set {KEY}.base_model=null (or list it in {KEY}.models)"
        )
    if not mm.get("base_model") and policy == BasePolicy.REQUIRED:
        raise ConfigError(
            f"{KEY}.base_model: {spec.name} needs a base model (the one the others are merged "
            "onto / taken relative to)"
        )

    parameters = method_parameters(spec, mm.get("parameters"))
    entries = split_model_entries(mm.get("models"))
    per_model = per_model_parameters(spec, [own for _, own in entries], mm.get("model_parameters"))
    base = None
    if mm.get("base_model"):
        base_key = f"{KEY}.base_model"
        base = InputModel(base_key, mm["base_model"], resolve_model_dir(mm["base_model"], base_key))
    models = tuple(
        InputModel(f"{KEY}.models[{i}]", given, resolve_model_dir(given, f"{KEY}.models[{i}]"), p)
        for i, ((given, _), p) in enumerate(zip(entries, per_model, strict=True))
    )

    seen = {base.path: base} if base else {}
    for model in models:
        if model.path in seen:
            raise ConfigError(
                f"{model.key}={model.given!r}: the same checkpoint as {seen[model.path].key}"
            )
        seen[model.path] = model
    n_inputs = len(models) + (base is not None)
    low, high = spec.contract.min_inputs, spec.contract.max_inputs
    if n_inputs < max(low, 1 + (base is not None)) or (high is not None and n_inputs > high):
        expected = (
            f"{low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
        )
        raise ConfigError(
            f"{KEY}.models: {spec.name} merges {expected} checkpoints"
            + (" counting base_model" if base else "")
            + f"; got {len(models)} model(s)"
            + (" plus base_model" if base else "")
        )

    all_inputs = ([base] if base else []) + list(models)
    check_compatible(all_inputs)
    output_dir = Path(cfg["output_dir"]).expanduser().resolve()
    check_output_dir(output_dir, bool(cfg["overwrite"]), all_inputs)
    return MergePlan(
        method=spec.name,
        base=base,
        models=models,
        parameters=parameters,
        dtype=cfg["dtype"],
        out_dtype=cfg["out_dtype"],
        output_dir=output_dir,
        base_is_ignored=base_is_ignored,
    )


# --- mergekit config and options --------------------------------------------------------------


def _reference(path: Path) -> dict[str, Any]:
    # Structured, so that '@' (revision) and '+' (LoRA) in a path are not parsed by mergekit.
    return {"model": {"path": str(path)}}


def build_merge_config(plan: MergePlan) -> Any:
    """The ``mergekit.config.MergeConfiguration`` of a validated plan."""
    from mergekit.config import MergeConfiguration

    data: dict[str, Any] = {
        "merge_method": plan.method,
        "models": [
            {"model": _reference(m.path), "parameters": dict(m.parameters)} for m in plan.models
        ],
        "dtype": plan.dtype,
    }
    if plan.base is not None:
        data["base_model"] = _reference(plan.base.path)
    elif plan.base_is_ignored:
        # mergekit takes the output config.json and the tokenizer from base_model, else from
        # an input picked in set order (which varies between processes). Methods that ignore the
        # base merge it like any other input, so naming the first model makes the choice fixed.
        data["base_model"] = _reference(plan.models[0].path)
    if plan.out_dtype:
        data["out_dtype"] = plan.out_dtype
    if plan.parameters:
        data["parameters"] = dict(plan.parameters)
    try:
        return MergeConfiguration.model_validate(data)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"mergekit rejected the merge config: {err}") from err


def merge_options(cfg: Mapping[str, Any]) -> Any:
    """``mergekit.options.MergeOptions`` from the top-level options of the config."""
    from mergekit.options import MergeOptions

    return MergeOptions(
        copy_tokenizer=bool(cfg["copy_tokenizer"]),
        lazy_unpickle=bool(cfg["lazy_unpickle"]),
        low_cpu_memory=bool(cfg["low_cpu_memory"]),
        trust_remote_code=bool(cfg["trust_remote_code"]),
        random_seed=int(cfg["seed"]),
        device=str(cfg["device"]),
        write_model_card=bool(cfg["write_model_card"]),
        safe_serialization=True,
        quiet=False,
    )


# --- Manifest ---------------------------------------------------------------------------------


def sha256_file(path: Path, chunk_size: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def weight_hashes(model_dir: Path) -> dict[str, dict[str, Any]]:
    """File name -> sha256 and size of every weight file of a checkpoint."""
    return {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in weight_files(model_dir)
    }


def _describe(model: InputModel) -> dict[str, Any]:
    return {
        "path": model.given,
        "resolved_path": str(model.path),
        "parameters": model.parameters,
        "weights": weight_hashes(model.path),
    }


def build_manifest(plan: MergePlan, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What went into the merge: every input checkpoint with the hashes of its weight files."""
    return {
        "method": plan.method,
        "parameters": plan.parameters,
        "base_model": _describe(plan.base) if plan.base else None,
        "models": [_describe(m) for m in plan.models],
        "dtype": plan.dtype,
        "out_dtype": plan.out_dtype,
        "seed": int(cfg["seed"]),
        "output_dir": str(plan.output_dir),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "versions": {p: version(p) for p in ("mergekit", "transformers", "torch")},
    }
