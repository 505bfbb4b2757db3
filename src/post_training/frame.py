"""The run frame shared by the training entrypoints, and the error printing of every entrypoint.

A training entrypoint reads top to bottom and states only what differs::

    frame = begin(cfg)                      # validate -> accelerator, seed -> run dir -> tokenizer
    train, eval_rows = <its data>(frame)    # tokenized rows
    model = load_policy(frame)              # + PEFT
    return finish(frame, <its trainer>, model, train, eval_rows, loss=..., ...)
                                            # trainer -> final model -> end-of-run evaluation

Validation (:func:`validate`) runs before anything is written: the typed schema of the
entrypoint (:mod:`post_training.schema`) and the dataset specs (keys, amounts, splits), so a bad
value stops the launch with one line naming the key, the value and the rule.

:func:`entrypoint` wraps ``@hydra.main`` for every entrypoint: a :class:`ProjectError` (config,
data) prints one line and exits 2, without a traceback (``HYDRA_FULL_ERROR=1`` or
``debug.traceback=true`` shows it; a second launch of a running job exits 73,
:data:`post_training.utils.job_lock.EXIT_CODE_LOCKED`); other exceptions keep theirs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from post_training.errors import ProjectError
from post_training.utils.config import CONFIGS_DIR, register_resolvers, to_container

log = logging.getLogger(__name__)
register_resolvers()


def _config_groups(entrypoint: str) -> str:
    from post_training.config_help import config_groups

    return config_groups(entrypoint)


if not OmegaConf.has_resolver("pt.config_groups"):  # the `--help` listing (setup.yaml)
    OmegaConf.register_new_resolver("pt.config_groups", _config_groups)

EXIT_CODE_PROJECT_ERROR = 2


# ------------------------------------------------------------------------------ errors
def wants_traceback(cfg: DictConfig | None) -> bool:
    """``HYDRA_FULL_ERROR=1`` or ``debug.traceback=true``."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    debug = cfg.get("debug") if cfg is not None else None
    return bool(debug is not None and debug.get("traceback"))


def report_project_errors(run: Callable[[DictConfig], int | None], cfg: DictConfig) -> int:
    """``run(cfg)``'s exit code; a project error becomes one line on stderr and exit code 2."""
    try:
        code = run(cfg)
    except ProjectError as error:
        code = getattr(error, "exit_code", EXIT_CODE_PROJECT_ERROR)
        record_end(cfg, code, str(error).splitlines()[0] if str(error) else type(error).__name__)
        if wants_traceback(cfg):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        return code
    except BaseException as error:  # marked in status.json, then shown as Python shows it
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
        if isinstance(error, SystemExit):
            code = error.code if isinstance(error.code, int) else 1
        first = str(error).splitlines()[0] if str(error) else ""
        record_end(cfg, code, f"{type(error).__name__}: {first}".rstrip(": "))
        raise
    code = code if isinstance(code, int) else 0  # some entrypoints return what they wrote
    record_end(cfg, code, None)
    return code


def record_end(cfg: DictConfig | None, code: int, error: str | None) -> None:
    """``status.json``: the run's end, or, for a launch that started no run, in its Hydra dir
    (rank 0 only; the dirs of other ranks move into the run dir)."""
    from post_training.utils import run_status
    from post_training.utils.progress import launch_rank

    if run_status.active():
        run_status.finish(code, error)
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        directory = Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):  # not under @hydra.main
        return
    if (directory / run_status.STATUS_FILE).exists():
        return  # the run wrote its own end (frame.finish), before its report
    if launch_rank() == 0 and directory.is_dir():
        entrypoint = cfg.get("entrypoint") if cfg is not None else None
        run_status.mark_launch(directory, entrypoint, code, error)


def entrypoint(
    config_name: str, validated_by_run: bool = False
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """``@hydra.main`` for ``configs/<config_name>.yaml`` around ``run(cfg) -> exit code``:
    struct mode, the schema checked before ``run`` starts (``validated_by_run``: ``run``
    validates first thing itself, through :func:`begin`), project errors as one line."""
    import hydra

    def wrap(run: Callable[[DictConfig], Any]) -> Callable[[], None]:
        def checked(cfg: DictConfig) -> Any:
            if not validated_by_run:
                validate(cfg)
            return run(cfg)

        # Absolute config dir; the job (and its log file) is named by `hydra.job.name:
        # ${entrypoint}` in setup.yaml, not by this file.
        @hydra.main(config_path=str(CONFIGS_DIR), config_name=config_name, version_base=None)
        def main(cfg: DictConfig) -> None:
            OmegaConf.set_struct(cfg, True)
            code = report_project_errors(checked, cfg)
            if "torch" in sys.modules:  # a launch refused before torch (a held job lock) exits now
                from post_training.utils.distributed import leave_without_teardown

                leave_without_teardown(code or 0)
            if code:
                sys.exit(code)

        return main

    return wrap


# ------------------------------------------------------------------------------ validation
def apply_debug(cfg: DictConfig) -> None:
    """``debug.enabled``: a few steps (the output root is already ``outputs-debug``)."""
    if not cfg.debug.enabled or "training_args" not in cfg:
        return
    for key in ("num_train_epochs", "num_training_samples", "num_training_tokens"):
        if key in cfg.training_args:
            cfg.training_args[key] = None
    cfg.training_args.max_steps = cfg.debug.max_steps
    if "evaluation" in cfg:
        cfg.evaluation.max_examples = 20


def validate(cfg: DictConfig) -> Any:
    """The typed config of ``cfg`` (:mod:`post_training.schema`), with the dataset specs
    checked too (no data is read); raises a :class:`~post_training.errors.ConfigError` before
    anything is written. Idempotent."""
    from post_training.data_sft.dataset_config import check_dataset_config
    from post_training.schema import check

    apply_debug(cfg)
    typed = check(to_container(cfg))
    datasets = {
        "dataset": getattr(typed, "dataset", None),
        "evaluation.dataset": getattr(getattr(typed, "evaluation", None), "dataset", None),
    }
    for where, dataset in datasets.items():
        if dataset is not None:
            check_dataset_config(dataset.model_dump(), where)
    return typed


# ------------------------------------------------------------------------------ the frame
@dataclass
class Frame:
    """What every training entrypoint builds first."""

    args: Any  # the typed config: post_training.schema.TrainSFT / TrainPreference
    accelerator: Any
    run: Any  # post_training.utils.run.RunContext
    tokenizer: Any

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config, as frozen in the run dir (plain dicts)."""
        return self.run.config


def begin(cfg: DictConfig, check: Callable[[Any], None] | None = None) -> Frame:
    """Lock the resume target, validate, then accelerator and seed, run dir (+ the checkpoint
    to resume from), tokenizer. The lock comes first, before torch is even imported, so that a
    second launch of a running job exits within a second or two (exit 73,
    :mod:`post_training.utils.job_lock`); it creates nothing before validation (a job that has
    no checkpoint dir yet is locked by ``setup_run``, after it)."""
    from post_training.utils.run import lock_resume_target, setup_run

    apply_debug(cfg)  # the resume target is the hash of the config as it will run
    try:
        resolved = to_container(cfg)
    except Exception:  # an unresolvable config: validation names it; the lock waits for setup_run
        resolved = None
    if resolved is not None:
        lock_resume_target(resolved, only_if_exists=True)
    args = validate(cfg)
    if check is not None:  # the entrypoint's own rules on the typed config, before any write
        check(args)

    from accelerate.utils import set_seed

    from post_training.modeling.loading import (
        check_model_paths,
        check_quantization,
        load_tokenizer,
    )

    check_quantization(args.model.model_dump(), args.model_args.model_dump())
    check_model_paths(args.model.model_dump())  # before the run dir is written
    from post_training.modeling.run_inputs import check_run_inputs

    check_run_inputs(args)  # the reference model and the Hub datasets: local, or one line
    from post_training.utils.distributed import make_accelerator
    from post_training.utils.progress import silence_known_warnings

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    silence_known_warnings()
    training = args.training_args
    accelerator = make_accelerator(  # DeepSpeed / FSDP2 on CPU ranks too (gloo)
        training.gradient_accumulation_steps, training.mixed_precision, training.ddp_timeout
    )
    set_seed(args.seed)
    run = setup_run(cfg, accelerator)
    return Frame(args, accelerator, run, load_tokenizer(run.config["model"]))


def load_policy(frame: Frame, reward_head: bool = False) -> Any:
    """The model to train (``model``), with LoRA adapters when ``model_args.use_peft``;
    ``reward_head``: as a one-label sequence classifier (``train_reward``)."""
    from post_training.modeling.loading import apply_peft, load_model

    model_args = frame.config["model_args"]
    model = load_model(frame.config["model"], frame.tokenizer, model_args, reward_head=reward_head)
    task = "SEQ_CLS" if reward_head else "CAUSAL_LM"
    return apply_peft(model, model_args, task_type=task, seed=frame.args.seed)


def load_pairs(
    frame: Frame, what: str = "Preference pairs"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tokenized train / eval rows of the preference ``dataset`` (the main process first:
    it writes the cache), logged as ``<what>: N train, M eval; <filter reports>``."""
    from post_training.data_preference.encode import describe_reports, load_preference_data

    with frame.accelerator.main_process_first():
        train, eval_rows, reports = load_preference_data(frame.config, frame.tokenizer)
    log.info(
        "%s: %d train, %d eval; %s", what, len(train), len(eval_rows), describe_reports(reports)
    )
    return train, eval_rows


def finish(
    frame: Frame,
    trainer_class: type,
    model: Any,
    train: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    *,
    loss: Any,
    evaluation_dataset: Mapping[str, Any] | None,
    reference: Any = None,
    callbacks: Sequence[Any] = (),
) -> int:
    """Build the trainer, train, save the final model, score it on ``evaluation_dataset``
    (exact match); the exit code (75 when a signal stopped the run after its checkpoint)."""
    from post_training.exact_match import evaluate_final_model
    from post_training.harness import harness_callbacks
    from post_training.trainers.base import TrainerContext
    from post_training.utils.run import tracker_run_id
    from post_training.utils.signals import EXIT_CODE_STOPPED
    from post_training.utils.tracking import MetricsLogger

    accelerator, run, args = frame.accelerator, frame.run, frame.args
    metrics = MetricsLogger(
        run.run_dir,
        run.config,
        run_id=tracker_run_id(run, args.job_subdir) if accelerator.is_main_process else "",
        enabled=accelerator.is_main_process,
        tensorboard=args.tensorboard,
        wandb_cfg=run.config["wandb"],
    )
    try:
        trainer = trainer_class(
            TrainerContext(
                config=args,
                model=model,
                tokenizer=frame.tokenizer,
                train_data=train,
                eval_data=eval_rows,
                accelerator=accelerator,
                run=run,
                metrics=metrics,
                loss=loss,
                reference=reference,
                callbacks=[*callbacks, *harness_callbacks(run.config), *EXTRA_CALLBACKS],
            )
        )
        outcome = trainer.train()
        if outcome.stopped_by_signal:
            code = EXIT_CODE_STOPPED
        else:
            del trainer, model  # evaluation scores the saved final model, as `evaluate` would
            accelerator.free_memory()
            evaluation = run.config.get("evaluation") or {}  # train_reward has none
            if evaluation_dataset and evaluation["at_end"] and accelerator.is_main_process:
                evaluate_final_model(
                    outcome.final_model_dir,
                    dict(evaluation_dataset),
                    evaluation,
                    args.model.torch_dtype,
                    metrics,
                    outcome.state.global_step,
                    start=start_model(run.config, run.run_dir),
                )
            code = 0
    finally:
        metrics.close()
        accelerator.end_training()
    if accelerator.is_main_process:
        from post_training.utils import run_status

        run_status.finish(code)  # before the report, which shows it
        write_run_report(run.run_dir)
    return code


def start_model(config: Mapping[str, Any], run_dir: Any) -> tuple[Path, Path] | None:
    """``(start checkpoint, run dir)`` when the run began from a saved model directory and
    ``evaluation.compare_start`` is on (the end-of-run comparison); None otherwise."""
    model = config["model"]
    if model.get("init_from_config") or not config["evaluation"].get("compare_start", True):
        return None
    path = Path(str(model["model_name_or_path"]))
    return (path, Path(run_dir)) if (path / "config.json").is_file() else None


def write_run_report(run_dir: Any) -> None:
    """``report.html`` and its plots in ``run_dir`` (:mod:`post_training.report`); a failure to
    plot is a warning, never the run's failure."""
    from post_training.report import write_report

    try:
        path = write_report([run_dir], run_dir)
    except Exception as error:
        log.warning("report.html not written: %s: %s", type(error).__name__, error)
        return
    log.info("Report: %s", path)


EXTRA_CALLBACKS: list[Any] = []
"""Callbacks every trainer built by :func:`finish` gets (a benchmark's step timer, say), on top
of the entrypoint's own."""
