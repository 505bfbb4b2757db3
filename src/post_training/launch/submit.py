"""Experiment sweeps to self-requeueing ``sbatch`` lines (engine of ``reproducibility-scripts/``).

A template's ``generate_submit.py`` declares its sweep at the top (models × datasets ×
hyper-parameters, wall time, global batch size) and calls :func:`generate_sft` or
:func:`generate_alignment`. They write ``<template>/<prefix>-<YYYY-MM-DD-HH-MM>/submit.sh``
with one ``sbatch`` line per run (stdout and stderr under that folder's ``out/``), each
calling ``cscs-shared-submit-scripts/recursive-unattended-accelerate.sh``, and print the total
number of nodes. ``bash <folder>/submit.sh`` submits them all.

Every value goes through two quoting layers: Hydra's override grammar (:func:`hydra_value`;
quotes, backslashes and ``${`` escaped so the run's resolved config holds the value verbatim)
and the shell (:func:`shlex.quote`), so paths with spaces, quotes, ``$`` or ``;`` arrive
literally.

``python -m post_training.submit`` (:mod:`post_training.submit`) builds one run with the same
functions (:func:`sft_run`, :func:`alignment_run`, :func:`sbatch_line`, :func:`write_submit`)
from a command line, without a template.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from post_training.data_alignment.pipeline import ALIGNMENT_STAGES
from post_training.errors import SubmitError
from post_training.utils.config import CONFIGS_DIR, PACKAGE_DIR

REPO_DIR = PACKAGE_DIR.parents[1]
SUBMIT_SCRIPTS_DIR = Path(
    os.environ.get("SUBMIT_SCRIPTS_DIR") or REPO_DIR / "cscs-shared-submit-scripts"
)
RECURSIVE_SCRIPT = "recursive-unattended-accelerate.sh"
ACCELERATE_CONFIGS_DIR = CONFIGS_DIR / "accelerate"


# ------------------------------------------------------------------------------ arithmetic
def gradient_accumulation(
    global_batch_size: int, nodes: int, devices_per_node: int, per_device_batch_size: int
) -> int:
    """``global / (nodes × devices per node × per-device batch)``; refuses a fractional split."""
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("nodes", nodes),
        ("devices_per_node", devices_per_node),
        ("per_device_batch_size", per_device_batch_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SubmitError(f"{name} must be a positive integer, got {value!r}")
    per_step = nodes * devices_per_node * per_device_batch_size
    accumulation, remainder = divmod(global_batch_size, per_step)
    if remainder or accumulation == 0:
        raise SubmitError(
            f"global batch size {global_batch_size} is not a whole multiple of nodes × devices "
            f"per node × per-device batch = {nodes} × {devices_per_node} × "
            f"{per_device_batch_size} = {per_step} (accumulation would be "
            f"{global_batch_size / per_step:g}); change the global batch, the nodes or the "
            "per-device batch size"
        )
    return accumulation


# ---------------------------------------------------------------------------------- naming
def name_value(value: Any) -> str:
    """Compact text of a swept value for run names: 0.001 -> 0.001, 2e-05 -> 2e-05, True -> true."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(name_value(v) for v in value)
    return str(value)


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: str) -> str:
    """Keep letters, digits and ``._+-``; anything else (``/``, spaces, quotes) becomes ``_``."""
    return _UNSAFE_NAME_CHARS.sub("_", text).strip("_") or "_"


def job_id(
    model: str,
    dataset: str,
    hyperparameters: Mapping[str, Any],
    short_names: Mapping[str, str] | None = None,
) -> str:
    """``<model>_<dataset>_<key>-<value>...`` from the swept values, safe for paths and SLURM.

    A key is shown by its ``short_names`` entry, else its last dotted component
    (``training_args.learning_rate`` -> ``learning_rate``).
    """
    short_names = short_names or {}
    parts = [safe_name(model), safe_name(dataset)]
    for key, value in hyperparameters.items():
        short = short_names.get(key, key.rsplit(".", 1)[-1])
        parts.append(safe_name(f"{short}-{name_value(value)}"))
    return "_".join(parts)


# ------------------------------------------------------------------------- Hydra quoting
# Unquoted Hydra values that need no escaping (and keep their Hydra type: int, float, bool...).
_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_./@:+\-][A-Za-z0-9_./@:+\-]*")


def _escape_quoted(text: str) -> str:
    """Body of a single-quoted Hydra string whose resolved value is exactly ``text``.

    Two layers: OmegaConf resolves ``${...}``, so a literal ``${`` becomes ``\\${`` (and the
    backslashes before it are doubled); Hydra's quoted strings treat a backslash specially only
    before a quote or at the end, so those backslash runs are doubled and ``'`` becomes ``\\'``.
    """
    # OmegaConf layer: N backslashes then "${"  ->  2N+1 backslashes then "${".
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra layer: N backslashes before a quote or the end -> 2N, and the quote escaped.
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)


@functools.cache
def _override_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _bare_is_itself(text: str) -> bool:
    """Hydra reads ``text`` unquoted as this very string (not null, a bool or a number)."""
    if not _HYDRA_PLAIN.fullmatch(text):
        return False
    value = _override_parser().parse_override(f"key={text}").value()
    return isinstance(value, str) and value == text


class HydraText(str):
    """A value already written in Hydra's override grammar, as typed after ``key=`` on a command
    line (``1e-3``, ``[a,b]``, ``'a b'``, ``${oc.env:X}``): :func:`hydra_value` writes it as it
    is, so the job's Hydra reads it as it would have read the command line. How
    ``python -m post_training.submit`` passes its overrides on."""


def hydra_value(value: Any) -> str:
    """A Python value as the right-hand side of a Hydra override.

    ``None`` -> ``null``, booleans -> ``true``/``false``, numbers as Python writes them,
    lists -> ``[a,b]``, dicts -> ``{k:v}``. A string always arrives as exactly that string: bare
    when Hydra reads it back unchanged (``model=tiny``, ``/data/x.jsonl``), otherwise
    single-quoted and escaped (spaces, quotes, ``$``, ``${...}``, ``;``, ``,``, ``=``,
    backslashes, and strings such as ``"null"``, ``"true"`` or ``"1e-3"``). A :class:`HydraText`
    is written unchanged.
    """
    if isinstance(value, HydraText):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str) or not _HYDRA_PLAIN.fullmatch(key):
                raise SubmitError(f"dict key {key!r} is not a plain Hydra key")
            items.append(f"{key}:{hydra_value(item)}")
        return "{" + ",".join(items) + "}"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise SubmitError(f"cannot write {type(value).__name__} {value!r} as a Hydra value")
    if _bare_is_itself(value):
        return value
    return "'" + _escape_quoted(value) + "'"


_HYDRA_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][A-Za-z0-9_.\-/@]*")


def hydra_override(key: str, value: Any) -> str:
    """``key=value`` with the value written by :func:`hydra_value`."""
    if not _HYDRA_KEY.fullmatch(key):
        raise SubmitError(f"{key!r} is not a Hydra override key")
    return f"{key}={hydra_value(value)}"


# ------------------------------------------------------------------------------ site setup
def setup_variables(*names: str, setup_sh: Path | None = None) -> dict[str, str]:
    """The values ``setup.sh`` gives these variables, as the jobs will see them (a value already
    in the environment wins there too); ``""`` for an unset one."""
    setup = setup_sh or SUBMIT_SCRIPTS_DIR / "setup.sh"
    if not setup.is_file():
        raise SubmitError(f"no site settings at {setup}")
    proc = subprocess.run(
        [
            "bash",
            "-c",
            'source "$1" >/dev/null || exit; shift; for v; do printf "%s\\0" "${!v:-}"; done',
            "_",
            str(setup),
            *names,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    values = proc.stdout.split("\0")[:-1]
    if proc.returncode != 0 or len(values) != len(names):
        raise SubmitError(f"{setup} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return dict(zip(names, values, strict=True))


def devices_per_node(setup_sh: Path | None = None) -> int:
    """``DEVICES_PER_NODE`` as ``setup.sh`` sets it (the environment's value wins there too)."""
    setup = setup_sh or SUBMIT_SCRIPTS_DIR / "setup.sh"
    text = setup_variables("DEVICES_PER_NODE", setup_sh=setup)["DEVICES_PER_NODE"].strip()
    if not text.isdigit() or int(text) < 1:
        raise SubmitError(f"{setup}: DEVICES_PER_NODE must be a positive integer, got {text!r}")
    return int(text)


# ------------------------------------------------------------------------------ the lines
@dataclass(frozen=True)
class Model:
    """One model of a sweep: its config choice and how it is laid out on the cluster."""

    name: str  # configs/model/<name>.yaml
    nodes: int = 1
    per_device_batch_size: int = 8
    accelerate: str = "cpu"  # configs/accelerate/<accelerate>.yaml, for launch and Hydra
    overrides: Mapping[str, Any] = field(default_factory=dict)  # extra overrides of this model


@dataclass(frozen=True)
class Run:
    """One sbatch line: ``sbatch <options> <script> <args>``."""

    name: str
    nodes: int
    args: tuple[str, ...]  # arguments of the wrapper: accelerate launch options, module, overrides
    array_size: int = 1  # > 1: a job array of that many tasks (data pipeline partitions)

    @property
    def array(self) -> str | None:
        return f"0-{self.array_size - 1}" if self.array_size > 1 else None


def launch_args(accelerate: str, module: str, overrides: Sequence[str]) -> tuple[str, ...]:
    """``--config_file <accelerate yaml> -m <module> <overrides...>`` for the wrapper."""
    config_file = ACCELERATE_CONFIGS_DIR / f"{accelerate}.yaml"
    if not config_file.is_file():
        known = sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))
        raise SubmitError(f"no accelerate config {accelerate!r} (known: {known})")
    return ("--config_file", str(config_file), "-m", module, *overrides)


def sbatch_line(
    run: Run,
    out_dir: Path,
    time: str,
    script: Path | None = None,
    sbatch_options: Sequence[str] = (),
) -> str:
    """The shell line that submits ``run``; every word is shell-quoted."""
    script = script or SUBMIT_SCRIPTS_DIR / RECURSIVE_SCRIPT
    # sbatch expands %-patterns in file names: %% is a literal %.
    stem = str(out_dir / run.name).replace("%", "%%")
    suffix = "-%a" if run.array else ""
    argv = [
        "sbatch",
        f"--job-name={run.name}",
        f"--nodes={run.nodes}",
        f"--time={time}",
        f"--output={stem}{suffix}.out",
        f"--error={stem}{suffix}.err",
    ]
    if run.array:
        argv.append(f"--array={run.array}")
    argv += [*sbatch_options, str(script), *run.args]
    return shlex.join(argv)


def submit_script(
    lines: Sequence[str],
    runs: Sequence[Run],
    generator: Path | str,
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> str:
    """Text of ``submit.sh``: site settings (setup.sh), optional exports, the sbatch lines."""
    now = now or datetime.now()
    nodes = total_nodes(runs)
    header = [
        "#!/usr/bin/env bash",
        f"# Generated by {generator} on {now:%Y-%m-%d %H:%M}: {total_runs(runs)} runs, "
        f"{nodes} nodes in total.",
        "# Submit: bash submit.sh (jobs run in the repository root; site settings in setup.sh).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO_DIR))}",
        f"source {shlex.quote(str(SUBMIT_SCRIPTS_DIR / 'setup.sh'))}",
    ]
    for key, value in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SubmitError(f"{key!r} is not an environment variable name")
        header.append(f"export {key}={shlex.quote(str(value))}")
    return "\n".join([*header, "", *lines, ""])


def total_nodes(runs: Iterable[Run]) -> int:
    """Nodes of all runs at once (an array task counts as a run)."""
    return sum(run.nodes * run.array_size for run in runs)


def total_runs(runs: Iterable[Run]) -> int:
    return sum(run.array_size for run in runs)


def write_submit(
    template_dir: Path,
    prefix: str,
    runs: Sequence[Run],
    time: str,
    generator: Path | str,
    env: Mapping[str, str] | None = None,
    sbatch_options: Sequence[str] = (),
    now: datetime | None = None,
) -> Path:
    """Write ``<template_dir>/<prefix>-<YYYY-MM-DD-HH-MM>/submit.sh`` and its ``out/``."""
    if not runs:
        raise SubmitError("the sweep is empty: no run to submit")
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SubmitError(
            f"several runs share a name (add the differing key to the sweep): {duplicates}"
        )
    now = now or datetime.now()
    folder = template_dir / f"{safe_name(prefix)}-{now:%Y-%m-%d-%H-%M}"
    if folder.exists():
        raise SubmitError(f"{folder} already exists (generated this minute?): not overwriting it")
    out_dir = folder / "out"
    lines = [sbatch_line(run, out_dir, time, sbatch_options=sbatch_options) for run in runs]
    text = submit_script(lines, runs, generator, env, now)
    out_dir.mkdir(parents=True)
    path = folder / "submit.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path


# -------------------------------------------------------------------------------- sweeps
def sweep(hyperparameters: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the swept values, in declaration order."""
    for key, values in hyperparameters.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SubmitError(f"sweep values of {key!r} must be a non-empty list, got {values!r}")
    keys = list(hyperparameters)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*hyperparameters.values())
    ]


# Set by the generator for every run: a sweep or override may not set them.
RESERVED_KEYS = frozenset(
    {
        "model",
        "dataset",
        "accelerate",
        "artifacts_subdir",
        "job_subdir",
        "wandb.run_name",
        "wandb.tags",
        "resuming.resume",
        "training_args.per_device_train_batch_size",
        "training_args.gradient_accumulation_steps",
        "partition.index",
        "partition.count",
    }
)


def _check_keys(where: str, keys: Iterable[str]) -> None:
    clash = sorted(set(keys) & RESERVED_KEYS)
    if clash:
        raise SubmitError(
            f"{where} sets {clash}, which the generator derives (models, datasets, batch sizes, "
            "names, resuming): declare them through MODELS / DATASETS / GLOBAL_BATCH_SIZE"
        )


# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes or days-hours:minutes:seconds.
_WALL_TIME = re.compile(r"\d+(:[0-5]?\d){0,2}|\d+-([01]?\d|2[0-3])(:[0-5]?\d){0,2}")


def check_time(time: str, key: str = "TIME") -> None:
    """A wall time as sbatch ``--time`` takes it, not zero (a chain needs a time limit)."""
    text = str(time)
    if not _WALL_TIME.fullmatch(text) or not re.search(r"[1-9]", text):
        raise SubmitError(
            f"{key}={text!r}: a wall time is minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
            "D-HH:MM:SS (sbatch --time; minutes and seconds below 60, hours of a day below 24, "
            "not zero)"
        )


def sft_runs(
    *,
    prefix: str,
    models: Sequence[Model],
    datasets: Sequence[str],
    hyperparameters: Mapping[str, Sequence[Any]],
    global_batch_size: int,
    devices: int,
    artifacts_subdir: str,
    overrides: Mapping[str, Any] | None = None,
    short_names: Mapping[str, str] | None = None,
    module: str = "post_training.train_sft",
) -> list[Run]:
    """One resumable run per (model, dataset, hyper-parameter combination)."""
    _check_keys("HYPERPARAMETERS", hyperparameters)
    _check_keys("OVERRIDES", overrides or {})
    for model in models:
        _check_keys(f"Model({model.name!r}).overrides", model.overrides)
    runs = []
    for model in models:
        accumulation = gradient_accumulation(
            global_batch_size, model.nodes, devices, model.per_device_batch_size
        )
        for dataset in datasets:
            for values in sweep(hyperparameters):
                name = job_id(model.name, dataset, values, short_names)
                runs.append(
                    sft_run(
                        name=name,
                        prefix=prefix,
                        model=model,
                        dataset=dataset,
                        values=values,
                        accumulation=accumulation,
                        artifacts_subdir=artifacts_subdir,
                        overrides=overrides,
                        module=module,
                    )
                )
    return runs


def sft_run(
    *,
    name: str,
    prefix: str,
    model: Model,
    dataset: str,
    values: Mapping[str, Any],
    accumulation: int,
    artifacts_subdir: str,
    overrides: Mapping[str, Any] | None = None,
    module: str = "post_training.train_sft",
) -> Run:
    """One run of :func:`sft_runs`: its overrides in a fixed order (layout, the model's, the swept
    values, the common ones, then the run's identity and resumability, which nothing overrides)."""
    settings: dict[str, Any] = {
        "model": model.name,
        "dataset": dataset,
        "accelerate": model.accelerate,
        "training_args.per_device_train_batch_size": model.per_device_batch_size,
        "training_args.gradient_accumulation_steps": accumulation,
        **model.overrides,
        **values,
        **(overrides or {}),
        # Identity and resumability of the run: not overridable by the sweep.
        "artifacts_subdir": artifacts_subdir,
        "job_subdir": f"{prefix}/{name}",
        "wandb.run_name": name,
        "wandb.tags": [prefix, model.name, dataset],
        "resuming.resume": True,
    }
    args = [hydra_override(key, value) for key, value in settings.items()]
    return Run(name, model.nodes, launch_args(model.accelerate, module, args))


def _cli(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch lines, write nothing"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the <prefix>-<date>/ folder goes (default: the template's folder)",
    )
    return parser.parse_args(argv)


def check_runs(runs: Sequence[Run]) -> None:
    """Compose every run's config as its job will (Hydra, the same overrides) and validate it
    against the entrypoint's schema, so a sweep with a bad value is refused before anything is
    written or submitted: a :class:`SubmitError` naming the run, the key, the value and the rule.
    Array tasks are checked as task 0."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from post_training.errors import ConfigError
    from post_training.schema import CONFIG_NAMES, check
    from post_training.utils.config import CONFIGS_DIR, register_resolvers

    register_resolvers()
    previous = os.environ.get("SLURM_ARRAY_TASK_ID")
    os.environ["SLURM_ARRAY_TASK_ID"] = "0"
    try:
        with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
            for run in runs:
                at = run.args.index("-m")
                entrypoint = run.args[at + 1].rsplit(".", 1)[-1]
                config_name = CONFIG_NAMES.get(entrypoint)
                if config_name is None:
                    continue  # a module without a schema of ours
                try:
                    cfg = compose(config_name, overrides=list(run.args[at + 2 :]))
                    check(OmegaConf.to_container(cfg, resolve=True))
                except ConfigError as error:
                    raise SubmitError(f"run {run.name}: {error}") from None
                except HydraException as error:
                    raise SubmitError(f"run {run.name}: {error}".splitlines()[0]) from None
    finally:
        if previous is None:
            os.environ.pop("SLURM_ARRAY_TASK_ID", None)
        else:
            os.environ["SLURM_ARRAY_TASK_ID"] = previous


def _emit(
    template_file: str | Path,
    prefix: str,
    runs: list[Run],
    time: str,
    args: argparse.Namespace,
    env: Mapping[str, str] | None,
    sbatch_options: Sequence[str],
) -> Path | None:
    template_dir = Path(template_file).resolve().parent
    generator = Path(template_file).resolve()
    check_runs(runs)
    if args.dry_run:
        out_dir = (args.output_dir or template_dir) / f"{safe_name(prefix)}-<date>" / "out"
        lines = [sbatch_line(run, out_dir, time, sbatch_options=sbatch_options) for run in runs]
        print(submit_script(lines, runs, generator, env))
        print(
            f"{total_runs(runs)} runs, {total_nodes(runs)} nodes in total "
            "(dry run: nothing written)"
        )
        return None
    path = write_submit(
        args.output_dir or template_dir, prefix, runs, time, generator, env, sbatch_options
    )
    print(f"Wrote {path}: {total_runs(runs)} runs, {total_nodes(runs)} nodes in total.")
    print(f"Submit them with: bash {shlex.quote(str(path))}")
    return path


def generate_sft(
    template_file: str | Path,
    *,
    prefix: str,
    time: str,
    models: Sequence[Model],
    datasets: Sequence[str],
    hyperparameters: Mapping[str, Sequence[Any]],
    global_batch_size: int,
    artifacts_subdir: str = "shared",
    overrides: Mapping[str, Any] | None = None,
    short_names: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    sbatch_options: Sequence[str] = (),
    argv: Sequence[str] | None = None,
    module: str = "post_training.train_sft",
) -> Path | None:
    """The ``main`` of an SFT template (or, with ``module``, of another training entrypoint's:
    ``post_training.train_online``): write its submit.sh (or print it with ``--dry-run``)."""
    args = _cli(f"Generate submit.sh for the SFT sweep in {template_file}.", argv)
    check_time(time)
    runs = sft_runs(
        prefix=prefix,
        models=models,
        datasets=datasets,
        hyperparameters=hyperparameters,
        global_batch_size=global_batch_size,
        devices=devices_per_node(),
        artifacts_subdir=artifacts_subdir,
        overrides=overrides,
        short_names=short_names,
        module=module,
    )
    return _emit(template_file, prefix, runs, time, args, env, sbatch_options)


# ------------------------------------------------------------------ alignment data stages
def alignment_runs(
    *,
    stage: str,
    prefix: str,
    models: Sequence[Model],
    datasets: Sequence[str],
    hyperparameters: Mapping[str, Sequence[Any]],
    partitions: int,
    artifacts_subdir: str,
    overrides: Mapping[str, Any] | None = None,
    short_names: Mapping[str, str] | None = None,
) -> list[Run]:
    """One SLURM job array per (model, dataset, combination): task i runs partition i of N.

    The stage entrypoints are ``post_training.data_alignment.<stage>`` (the alignment data
    pipeline) and take ``partition.index`` / ``partition.count``. With one partition a stage is
    one job (``partition.index=0``); ``merge_partitions`` is one job that reads all
    ``partition.count`` partitions. Each array task is a resumable job of its own (its
    ``job_subdir`` names the partition), so a requeued task resumes its partition.
    """
    if stage not in ALIGNMENT_STAGES:
        raise SubmitError(f"unknown alignment stage {stage!r}; stages: {list(ALIGNMENT_STAGES)}")
    if not isinstance(partitions, int) or partitions < 1:
        raise SubmitError(f"partitions must be a positive integer, got {partitions!r}")
    _check_keys("HYPERPARAMETERS", hyperparameters)
    _check_keys("OVERRIDES", overrides or {})
    runs = []
    for model in models:
        for dataset in datasets:
            for values in sweep(hyperparameters):
                name = safe_name(f"{stage}_{job_id(model.name, dataset, values, short_names)}")
                runs.append(
                    alignment_run(
                        stage=stage,
                        name=name,
                        prefix=prefix,
                        model=model,
                        dataset=dataset,
                        values=values,
                        partitions=partitions,
                        artifacts_subdir=artifacts_subdir,
                        overrides=overrides,
                    )
                )
    return runs


def alignment_run(
    *,
    stage: str,
    name: str,
    prefix: str,
    model: Model,
    dataset: str,
    values: Mapping[str, Any],
    partitions: int,
    artifacts_subdir: str,
    overrides: Mapping[str, Any] | None = None,
) -> Run:
    """One job (or job array) of :func:`alignment_runs`."""
    split = partitions > 1 and stage != "merge_partitions"
    module = f"post_training.data_alignment.{stage}"
    prefix = safe_name(prefix)
    settings: dict[str, Any] = {
        "model": model.name,
        "dataset": dataset,
        "accelerate": model.accelerate,
        **model.overrides,
        **values,
        **(overrides or {}),
        "artifacts_subdir": artifacts_subdir,
        "wandb.tags": [prefix, stage, model.name, dataset],
        "resuming.resume": True,
        "partition.count": partitions,
    }
    args = [hydra_override(key, value) for key, value in settings.items()]
    if split:
        # The task id is known only in the job: Hydra reads it from the environment (the shells
        # pass the text on unexpanded). Each partition is its own resumable job (job_subdir), so
        # a requeued task resumes its partition.
        # (Quoted: Hydra parses nested interpolations only in quoted values.)
        task = "${oc.env:SLURM_ARRAY_TASK_ID}"
        args += [
            f"partition.index='${{oc.decode:{task}}}'",
            f"job_subdir='{prefix}/{name}/partition-{task}'",
            f"wandb.run_name='{name}-partition-{task}'",
        ]
    else:
        if stage != "merge_partitions":
            args.append("partition.index=0")
        args += [
            f"job_subdir={prefix}/{name}",
            f"wandb.run_name={name}",
        ]
    return Run(
        name,
        model.nodes,
        launch_args(model.accelerate, module, args),
        array_size=partitions if split else 1,
    )


def generate_alignment(
    template_file: str | Path,
    *,
    stage: str,
    prefix: str,
    time: str,
    models: Sequence[Model],
    datasets: Sequence[str],
    hyperparameters: Mapping[str, Sequence[Any]] | None = None,
    partitions: int = 1,
    artifacts_subdir: str = "shared",
    overrides: Mapping[str, Any] | None = None,
    short_names: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    sbatch_options: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> Path | None:
    """The ``main`` of an alignment-stage template (SLURM arrays over data partitions)."""
    args = _cli(f"Generate submit.sh for the {stage} stage in {template_file}.", argv)
    check_time(time)
    runs = alignment_runs(
        stage=stage,
        prefix=prefix,
        models=models,
        datasets=datasets,
        hyperparameters=hyperparameters or {},
        partitions=partitions,
        artifacts_subdir=artifacts_subdir,
        overrides=overrides,
        short_names=short_names,
    )
    return _emit(template_file, prefix, runs, time, args, env, sbatch_options)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("Run a template's generate_submit.py (see reproducibility-scripts/README.md).")
