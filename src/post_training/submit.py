"""One run to SLURM without copying a template: ``python -m post_training.submit``.

    python -m post_training.submit <entrypoint> [key=value ...] [slurm.<key>=<value> ...]

``<entrypoint>`` is ``train_sft``, ``train_preference``, ``train_reward`` or an alignment data
stage (``filter_dataset_for_model``, ``generate_ref_completions``, ``compute_ref_logprobs``,
``compute_rewards``, ``prepare_train_dataset``, ``merge_partitions``). The ``slurm.*`` arguments
are this command's own (:data:`SETTINGS`); every other argument is a Hydra override of the
entrypoint, passed on exactly as typed (it is read by the job's Hydra as from a command line).

The run is the one a template of ``reproducibility-scripts/`` with this single run writes, built
by the same code (:mod:`post_training.launch.submit`): one self-requeueing ``sbatch`` line through
``cscs-shared-submit-scripts/recursive-unattended-accelerate.sh`` with ``resuming.resume=true``,
the same quoting, ``job_subdir=<slurm.prefix>/<name>``, logs ``out/<name>.out`` (retries
``out/<name>-retry<N>.out``) next to the ``submit.sh`` that records the line, and for training the
same gradient accumulation: global batch / (nodes × devices per node × per-device batch), refused
when not whole. The config is composed and validated as the job will compose it before anything
is written. By default this is a dry run: it prints the ``submit.sh`` it would write;
``slurm.dry_run=false`` writes ``<slurm.submit_dir>/<name>-<YYYY-MM-DD-HH-MM>/submit.sh``, runs it
(``sbatch``) and prints the job id. The same command later resumes the same run (same name, same
config). A mistake (unknown entrypoint or ``slurm`` key, a bad value) is one line, exit code 2.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from post_training.data_alignment.pipeline import ALIGNMENT_STAGES
from post_training.errors import ProjectError, SubmitError
from post_training.launch.submit import (
    ACCELERATE_CONFIGS_DIR,
    HydraText,
    Model,
    Run,
    alignment_run,
    check_runs,
    check_time,
    devices_per_node,
    gradient_accumulation,
    job_id,
    safe_name,
    sbatch_line,
    setup_variables,
    sft_run,
    submit_script,
    write_submit,
)

TRAINING_ENTRYPOINTS = ("train_sft", "train_preference", "train_reward")
ENTRYPOINTS = (*TRAINING_ENTRYPOINTS, *ALIGNMENT_STAGES)
MAX_NAME = 100  # longer derived names are cut and end in a hash of the whole name
EXIT_USAGE = 2


# ------------------------------------------------------------------------------ settings
def _positive_int(key: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise SubmitError(f"{key}={text!r}: must be a positive integer")
    return int(text)


def _non_negative_int(key: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise SubmitError(f"{key}={text!r}: must be a non-negative integer")
    return int(text)


def _boolean(key: str, text: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in value:
        raise SubmitError(f"{key}={text!r}: must be true or false")
    return value[text.lower()]


def _wall_time(key: str, text: str) -> str:
    check_time(text, key)
    return text


def _word(key: str, text: str) -> str:
    """An sbatch option value: one word, nothing a shell or sbatch would split."""
    if not re.fullmatch(r"[A-Za-z0-9_.,:@+\-]+", text):
        raise SubmitError(f"{key}={text!r}: must be a non-empty word (letters, digits, _.,:@+-)")
    return text


def _name(key: str, text: str) -> str:
    if safe_name(text) != text:
        raise SubmitError(f"{key}={text!r}: use only letters, digits and ._+- (a path part)")
    return text


def _accelerate(key: str, text: str) -> str:
    known = sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))
    if text not in known:
        raise SubmitError(f"{key}={text!r}: no such accelerate config; known: {', '.join(known)}")
    return text


def _directory(key: str, text: str) -> Path:
    if not text:
        raise SubmitError(f"{key}: must be a directory path")
    return Path(text).expanduser().absolute()


@dataclass(frozen=True)
class Setting:
    parse: Callable[[str, str], Any]
    default: Any
    help: str


SETTINGS: dict[str, Setting] = {
    "nodes": Setting(_positive_int, 1, "nodes of the job (one `accelerate launch` per node)"),
    "time": Setting(_wall_time, "04:00:00", "wall time of one attempt (the chain requeues)"),
    "partition": Setting(_word, None, "sbatch --partition (default: SBATCH_PARTITION, setup.sh)"),
    "account": Setting(_word, None, "sbatch --account (default: SBATCH_ACCOUNT)"),
    "qos": Setting(_word, None, "sbatch --qos (default: SBATCH_QOS)"),
    "reservation": Setting(_word, None, "sbatch --reservation"),
    "accelerate": Setting(
        _accelerate,
        None,
        "launch config configs/accelerate/<name>.yaml, also recorded as the Hydra group "
        "accelerate=<name> (default: the entrypoint's accelerate choice, cpu)",
    ),
    "devices_per_node": Setting(
        _positive_int,
        None,
        "processes per node (default: DEVICES_PER_NODE of setup.sh; exported to the job)",
    ),
    "global_batch_size": Setting(
        _positive_int,
        None,
        "training: sequences per optimizer step over all processes (default: the config's "
        "per-device batch × accumulation, i.e. the same command run as one process)",
    ),
    "partitions": Setting(_positive_int, 1, "alignment stages: data partitions (a job array)"),
    "prefix": Setting(_name, "submit", "job_subdir=<prefix>/<name>, and a wandb tag"),
    "job_name": Setting(
        _name, None, "the run's name (default: <model>_<dataset>_<override values>)"
    ),
    "submit_dir": Setting(
        _directory,
        None,
        "where <name>-<date>/submit.sh and out/ go (default: <artifacts>/<artifacts_subdir>/"
        "submit, artifacts as setup.sh sets POST_TRAINING_ARTIFACTS_DIR)",
    ),
    "max_retries": Setting(_non_negative_int, None, "MAX_RETRIES of the chain (setup.sh: 5)"),
    "dry_run": Setting(_boolean, True, "true: print the submit.sh, write and submit nothing"),
}

# Overrides the submitter derives itself (as a template's generator does).
DERIVED = {
    "job_subdir": "it is <slurm.prefix>/<name>: name the run with slurm.job_name / slurm.prefix",
    "wandb.run_name": "it is the run's name: set slurm.job_name",
    "wandb.tags": "they are [<slurm.prefix>, <model>, <dataset>]",
    "resuming.resume": "it is always true (each requeued attempt resumes the run)",
    "partition.index": "set slurm.partitions (SLURM array task i runs partition i)",
    "partition.count": "set slurm.partitions",
}


def usage() -> str:
    lines = [
        "usage: python -m post_training.submit <entrypoint> [key=value ...] "
        "[slurm.<key>=<value> ...]",
        "",
        f"entrypoints: {', '.join(ENTRYPOINTS)}",
        "key=value: a Hydra override of the entrypoint, passed on as typed",
        "slurm.<key>=<value>: this command's settings:",
    ]
    for key, setting in SETTINGS.items():
        default = "" if setting.default is None else f" [{str(setting.default).lower()}]"
        lines.append(f"  slurm.{key}{default}: {setting.help}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command
@dataclass
class Request:
    """The parsed command line: the entrypoint, ``slurm.*`` settings, the Hydra overrides."""

    entrypoint: str
    settings: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)  # key -> value as typed

    @property
    def training(self) -> bool:
        return self.entrypoint in TRAINING_ENTRYPOINTS


def parse(argv: Sequence[str]) -> Request:
    """The command line as a :class:`Request`; a mistake is a :class:`SubmitError`."""
    if not argv:
        raise SubmitError(f"name an entrypoint: {', '.join(ENTRYPOINTS)} (--help for usage)")
    entrypoint, *rest = argv
    entrypoint = entrypoint.removeprefix("post_training.").removeprefix("data_alignment.")
    if entrypoint not in ENTRYPOINTS:
        raise SubmitError(
            f"unknown entrypoint {argv[0]!r}: post_training.submit runs {', '.join(ENTRYPOINTS)}"
        )
    given: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for arg in rest:
        if arg.startswith("-"):
            raise SubmitError(
                f"{arg!r}: options are not passed on; give Hydra overrides key=value and "
                "slurm.<key>=<value> settings (--help for usage)"
            )
        key, equals, value = arg.partition("=")
        if not equals or not key:
            raise SubmitError(f"{arg!r}: expected key=value")
        bare = key.lstrip("+~")
        if bare == "slurm" or bare.startswith("slurm."):
            name = bare.removeprefix("slurm").removeprefix(".")
            if name not in SETTINGS:
                raise SubmitError(
                    f"unknown key {key!r}; slurm keys: " + ", ".join(f"slurm.{k}" for k in SETTINGS)
                )
            if key != bare:
                raise SubmitError(f"{arg!r}: slurm.* settings take no +/~ prefix")
            if name in given:
                raise SubmitError(f"{key} is given twice")
            given[name] = value
            continue
        if key in overrides:
            raise SubmitError(f"{key} is given twice")
        if bare in DERIVED:
            raise SubmitError(f"{key}={value}: set by post_training.submit; {DERIVED[bare]}")
        overrides[key] = value
    settings = {
        name: setting.parse(f"slurm.{name}", given[name]) if name in given else setting.default
        for name, setting in SETTINGS.items()
    }
    request = Request(entrypoint, settings, overrides)
    if not request.training and "global_batch_size" in given:
        raise SubmitError(
            f"slurm.global_batch_size: only for the training entrypoints "
            f"({', '.join(TRAINING_ENTRYPOINTS)}), not {entrypoint}"
        )
    if request.training and "partitions" in given:
        raise SubmitError(f"slurm.partitions: only for the alignment data stages, not {entrypoint}")
    return request


def _hydra_message(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _compose(config_name: str, overrides: list[str]) -> Any:
    """The entrypoint's config as the job composes it (with Hydra's choices of groups)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from post_training.utils.config import CONFIGS_DIR, register_resolvers

    register_resolvers()
    try:
        with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except HydraException as error:
        raise SubmitError(_hydra_message(error)) from None


def _typed(key: str, text: str) -> Any:
    """The value Hydra reads from ``key=text`` (for the overrides the submitter itself uses)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"{key}={text}").value()
    except HydraException as error:
        raise SubmitError(f"{key}={text}: {_hydra_message(error)}") from None


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SubmitError(f"{key}={value!r}: must be a positive integer")
    return value


@dataclass
class Plan:
    """What will be submitted: the run, how it is laid out, where its files go."""

    request: Request
    run: Run
    artifacts_subdir: str
    sbatch_options: tuple[str, ...]
    env: dict[str, str]
    summary: str

    @property
    def name(self) -> str:
        return self.run.name


def _run_name(request: Request, model: str, dataset: str, values: Mapping[str, Any]) -> str:
    given = request.settings["job_name"]
    if given:
        return given
    name = job_id(model, dataset, values)
    if not request.training:
        name = safe_name(f"{request.entrypoint}_{name}")
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


def plan(request: Request) -> Plan:
    """The run of ``request``, built by the template engine; its config composed and checked."""
    from post_training.schema import CONFIG_NAMES

    settings = request.settings
    nodes = settings["nodes"]
    overrides = dict(request.overrides)
    typed_accelerate = overrides.get("accelerate")
    accelerate = settings["accelerate"]
    if typed_accelerate is not None:
        value = _typed("accelerate", typed_accelerate)
        if accelerate is not None and value != accelerate:
            raise SubmitError(
                f"accelerate={value} and slurm.accelerate={accelerate} differ: give one "
                "(slurm.accelerate picks the launch config and the Hydra group)"
            )
        accelerate = _accelerate("accelerate", str(value))
    composed = _compose(
        CONFIG_NAMES[request.entrypoint], [f"{k}={v}" for k, v in overrides.items()]
    )
    choices = composed.hydra.runtime.choices
    accelerate = accelerate or choices["accelerate"]
    model, dataset = str(choices["model"]), str(choices["dataset"])
    artifacts_subdir = str(composed.artifacts_subdir)
    for key in ("model", "dataset", "accelerate", "artifacts_subdir"):
        overrides.pop(key, None)

    env: dict[str, str] = {}
    if settings["devices_per_node"] is not None:
        devices = settings["devices_per_node"]
        env["DEVICES_PER_NODE"] = str(devices)
    else:
        devices = devices_per_node()
    if settings["max_retries"] is not None:
        env["MAX_RETRIES"] = str(settings["max_retries"])
    processes = nodes * devices
    if accelerate == "cpu" and processes > 1:
        raise SubmitError(
            f"slurm.accelerate=cpu starts one process, but {nodes} node(s) × {devices} "
            f"device(s) = {processes} processes: choose ddp, ds-zero1, ds-zero2, ds-zero3 or fsdp"
        )
    prefix = settings["prefix"]
    values = {key: HydraText(value) for key, value in overrides.items()}

    if request.training:
        per_key = "training_args.per_device_train_batch_size"
        accumulation_key = "training_args.gradient_accumulation_steps"
        per_device = _positive(per_key, composed.training_args.per_device_train_batch_size)
        config_accumulation = _positive(
            accumulation_key, composed.training_args.gradient_accumulation_steps
        )
        values.pop(per_key, None)
        global_batch = settings["global_batch_size"]
        if global_batch is not None:
            if accumulation_key in values:
                raise SubmitError(
                    f"{accumulation_key} and slurm.global_batch_size both set the accumulation: "
                    "give one"
                )
            source = f"slurm.global_batch_size={global_batch}"
        elif accumulation_key in values:
            global_batch = config_accumulation * processes * per_device
            source = f"{accumulation_key}={config_accumulation} on {processes} process(es)"
        else:
            global_batch = per_device * config_accumulation
            source = (
                f"the config's {per_device} × {config_accumulation} "
                "(set slurm.global_batch_size to choose)"
            )
        values.pop(accumulation_key, None)
        try:
            accumulation = gradient_accumulation(global_batch, nodes, devices, per_device)
        except SubmitError as error:
            raise SubmitError(f"global batch {global_batch} from {source}: {error}") from None
        name = _run_name(request, model, dataset, values)
        run = sft_run(
            name=name,
            prefix=prefix,
            model=Model(model, nodes, per_device, accelerate),
            dataset=dataset,
            values=values,
            accumulation=accumulation,
            artifacts_subdir=artifacts_subdir,
            module=f"post_training.{request.entrypoint}",
        )
        layout = (
            f"global batch {global_batch} = {nodes} node(s) × {devices} device(s) × per-device "
            f"{per_device} × accumulation {accumulation}"
        )
    else:
        name = _run_name(request, model, dataset, values)
        run = alignment_run(
            stage=request.entrypoint,
            name=name,
            prefix=prefix,
            model=Model(model, nodes, accelerate=accelerate),
            dataset=dataset,
            values=values,
            partitions=settings["partitions"],
            artifacts_subdir=artifacts_subdir,
        )
        layout = f"{settings['partitions']} partition(s)"
    check_runs([run])  # composed and validated as the job will, before anything is written
    options = tuple(
        f"--{key}={settings[key]}"
        for key in ("partition", "account", "qos", "reservation")
        if settings[key] is not None
    )
    summary = (
        f"{request.entrypoint} {name}: {nodes} node(s) × {devices} device(s), "
        f"accelerate={accelerate}, {layout}; wall time {settings['time']} per attempt, "
        "requeued until the run completes"
    )
    return Plan(request, run, artifacts_subdir, options, env, summary)


def submit_dir(plan: Plan) -> Path:
    given = plan.request.settings["submit_dir"]
    if given is not None:
        return given
    artifacts = setup_variables("POST_TRAINING_ARTIFACTS_DIR")["POST_TRAINING_ARTIFACTS_DIR"]
    if not artifacts:
        raise SubmitError("setup.sh sets no POST_TRAINING_ARTIFACTS_DIR: give slurm.submit_dir")
    return Path(artifacts) / plan.artifacts_subdir / "submit"


def command_text(argv: Sequence[str]) -> str:
    """The command, for the header comment of ``submit.sh`` (one line: no line breaks)."""
    if any(ch in arg for arg in argv for ch in "\r\n"):
        return "python -m post_training.submit (arguments with line breaks: see the sbatch line)"
    return "python -m post_training.submit " + shlex.join(argv)


def line(plan: Plan, out_dir: Path) -> str:
    """The sbatch line of the plan, its logs in ``out_dir``."""
    return sbatch_line(
        plan.run, out_dir, plan.request.settings["time"], sbatch_options=plan.sbatch_options
    )


def main(argv: Sequence[str] | None = None, now: datetime | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    try:
        return _main(argv, now)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def _main(argv: list[str], now: datetime | None) -> int:
    request = parse(argv)
    the_plan = plan(request)
    directory = submit_dir(the_plan)
    generator = command_text(argv)
    print(the_plan.summary)
    if request.settings["dry_run"]:
        out_dir = directory / f"{the_plan.name}-<date>" / "out"
        print(submit_script([line(the_plan, out_dir)], [the_plan.run], generator, the_plan.env))
        print("dry run: nothing written or submitted (slurm.dry_run=false submits)")
        return 0
    path = write_submit(
        directory,
        the_plan.name,
        [the_plan.run],
        request.settings["time"],
        generator,
        the_plan.env,
        the_plan.sbatch_options,
        now=now,
    )
    print(path.read_text())
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, check=False)
    match = re.search(r"Submitted batch job (\d+)", proc.stdout)
    if proc.returncode != 0 or not match:
        shutil.rmtree(path.parent, ignore_errors=True)  # nothing submitted: nothing kept
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SubmitError(
            f"sbatch failed (exit {proc.returncode}): {detail[-1] if detail else 'no output'}"
        )
    out = path.parent / "out"
    print(f"Submitted batch job {match.group(1)}")
    print(f"submit.sh: {path}")
    print(f"logs: {out}/{the_plan.name}.out (retries: {the_plan.name}-retry<N>.out)")
    print(f"stop the whole chain: scancel --name={the_plan.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
