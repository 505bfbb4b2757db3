"""Benchmarks with EleutherAI's lm-eval harness, on a checkpoint or on the model being trained.

    python -m post_training.evaluate model_path=<dir> harness.tasks=[tiny_tasks,gsm8k]
    python -m post_training.train_sft evaluation.harness_every=200 evaluation.harness_tasks=[...]

:class:`Harness` loads the tasks once (names checked, datasets read: a task whose Hub dataset is
not cached offline, or an unknown name, is one :class:`~post_training.errors.ConfigError` line)
and runs them on any in-memory model through lm-eval's ``HFLM`` and ``simple_evaluate``:
prompts through the model's chat template by default (``apply_chat_template``; the rendered
text is tokenized without special tokens, as our trainers and ``evaluate`` do), batch size,
``limit`` and ``num_fewshot`` as configured. Results are flat ``harness/<task>/<metric>``
values (``/<filter>`` appended unless lm-eval's filter is ``none``; stderrs stay in the raw
results) plus lm-eval's raw results dict.

Local task definitions come from ``include_path`` (default :data:`DEFAULT_INCLUDE_PATH`: the
``tiny_tasks`` task, which scores the embedded tiny-tasks eval split exactly as ``evaluate``'s
exact match does). When every requested task is local, lm-eval's own ~15k task definitions are
not indexed at all (that index takes ~15 s).

:class:`HarnessCallback` runs the harness every ``evaluation.harness_every`` optimizer steps
(and at the last one) on the main process, on the unwrapped in-memory model, and logs the
values through ``trainer.log`` on every rank.

lm-eval is optional (``pip install 'post-training[eval]'``) and imported only when a harness
task is asked for.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from post_training.errors import ConfigError
from post_training.trainers.base import Trainer, TrainerCallback
from post_training.utils.atomic import atomic_write_json
from post_training.utils.config import ASSETS_DIR

log = logging.getLogger(__name__)

DEFAULT_INCLUDE_PATH = ASSETS_DIR / "tiny-tasks" / "lm-eval"
"""The task definitions shipped with the package (``tiny_tasks``)."""

OUTPUT_FILE = "eval-harness.json"
"""The results file ``evaluate`` writes into the checkpoint dir by default."""

INSTALL_HINT = "pip install 'post-training[eval]' (or pip install 'lm-eval[ifeval]>=0.4.13,<0.5')"

_QUIET = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
    "For example --metadata=",
)
"""lm-eval warnings that every in-memory run or local task triggers by design."""


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _QUIET)


def require_lm_eval(key: str) -> Any:
    """The ``lm_eval`` module; a ConfigError naming ``key`` when it is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"{key}: needs lm-eval, which is not installed: {INSTALL_HINT}") from None
    lm_logger = logging.getLogger("lm_eval")
    lm_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _QuietFilter) for f in lm_logger.filters):
        for name in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.api.task"):
            logging.getLogger(name).addFilter(_QuietFilter())
    return lm_eval


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------- loading tasks
def _datasets_of(index: Mapping[str, Any], name: str, depth: int = 0) -> list[str]:
    """The Hub dataset ids a task, group or tag of lm-eval's index reads (no data is read)."""
    entry = index.get(name)
    if entry is None or depth > 4:
        return []
    cfg = entry.cfg or {}
    if cfg.get("dataset_path"):
        return [str(cfg["dataset_path"])]
    children = list(entry.tags or ())
    if isinstance(cfg.get("task"), list):
        children += [c if isinstance(c, str) else c.get("task", "") for c in cfg["task"]]
    found: list[str] = []
    for child in children:
        for dataset in _datasets_of(index, str(child), depth + 1):
            if dataset not in found:
                found.append(dataset)
    return found


_UNREACHABLE = re.compile(r"Couldn't reach (?:the Hugging Face Hub for dataset )?'([^']+)'")
"""How ``datasets`` says that a Hub dataset is neither cached nor reachable."""


def _missing_dataset(error: BaseException) -> str | None:
    """The dataset id of a "not on this machine and the Hub is out of reach" error."""
    seen: BaseException | None = error
    while seen is not None:
        match = _UNREACHABLE.search(str(seen))
        if match:
            return match.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unknown_tasks_line(key: str, unknown: Sequence[str], known: Sequence[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r} (close matches: {', '.join(close) if close else 'none'})")
    return (
        f"{key}: no lm-eval task, group or tag named {'; '.join(parts)}; "
        "`lm-eval ls tasks` lists them"
    )


def _top_level(loaded: Mapping[str, Any]) -> list[Any]:
    """The Task and Group objects of a ``TaskManager.load`` result that no group contains."""
    children = {child for names in loaded["group_map"].values() for child in names}
    return [g for n, g in loaded["groups"].items() if n not in children] + [
        t for n, t in loaded["tasks"].items() if n not in children
    ]


@contextlib.contextmanager
def _no_environment_probe() -> Iterator[None]:
    """``simple_evaluate`` without its environment report (``torch.utils.collect_env`` runs
    ``pip list`` and more: ~2 s a call, every harness step of a training run), which
    ``eval-harness.json`` does not keep."""
    import lm_eval.evaluator as evaluator

    probe = getattr(evaluator, "add_env_info", None)
    if probe is not None:
        evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        if probe is not None:
            evaluator.add_env_info = probe


class Harness:
    """lm-eval tasks, loaded once (names checked, datasets read), to run on any model.

    ``key`` names the config key of the tasks in error messages."""

    def __init__(
        self,
        tasks: Sequence[str],
        include_path: str | Path | Sequence[str | Path] | None = None,
        key: str = "harness.tasks",
    ) -> None:
        lm_eval = require_lm_eval(f"{key}={list(tasks)}")
        from lm_eval.tasks import TaskManager

        if not tasks:
            raise ConfigError(f"{key}=[]: name at least one lm-eval task")
        self.names = list(tasks)
        self.version = lm_eval.__version__
        if include_path is None:
            paths = [str(DEFAULT_INCLUDE_PATH)]
        elif isinstance(include_path, str | Path):
            paths = [str(include_path)]
        else:
            paths = [str(p) for p in include_path]
        for path in paths:
            if not Path(path).is_dir():
                raise ConfigError(f"harness.include_path={path}: not a directory of task YAMLs")

        def known(manager: Any) -> bool:
            return all(n in manager.all_tasks or Path(n).is_file() for n in self.names)

        manager = TaskManager(include_path=paths, include_defaults=False)
        if not known(manager):  # a standard task: index lm-eval's own definitions too
            manager = TaskManager(include_path=paths)
        unknown = [n for n in self.names if n not in manager.all_tasks and not Path(n).is_file()]
        if unknown:
            raise ConfigError(_unknown_tasks_line(key, unknown, manager.all_tasks))
        self.manager = manager
        self.tasks: list[Any] = []
        for name in self.names:
            self.tasks += _top_level(self._load(name, key))

    def _load(self, name: str, key: str) -> dict[str, Any]:
        """``TaskManager.load([name])`` (reads the datasets); the usual failures as one line."""
        try:
            return self.manager.load([name])
        except ModuleNotFoundError as error:
            raise ConfigError(
                f"{key}: task {name!r} needs the Python package {error.name!r}, not installed "
                f"(lm-eval's extras install it, e.g. pip install 'lm-eval[{name}]')"
            ) from None
        except Exception as error:
            dataset = _missing_dataset(error)
            if dataset is None:
                raise
            datasets = _datasets_of(self.manager.task_index, name) or [dataset]
            offline = "HF_HUB_OFFLINE=1" if _offline() else "no network"
            raise ConfigError(
                f"{key}: task {name!r} reads the Hugging Face dataset {', '.join(datasets)}, "
                f"which is not in the local datasets cache, and the Hub is out of reach "
                f"({offline}): fetch it once with `HF_HUB_OFFLINE=0 python -m "
                f"post_training.evaluate model_path=<dir> exact_match=false harness.limit=1 "
                f"harness.tasks=[{name}]` (it stays cached for offline runs)"
            ) from None

    def run(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int | str = 64,
        limit: float | None = None,
        num_fewshot: int | None = None,
        apply_chat_template: bool = True,
        mixed_precision_dtype: str | None = None,
        bootstrap_iters: int = 100_000,
        seed: int | None = 0,
    ) -> HarnessResult:
        """All tasks on ``model`` (already on its device) with ``tokenizer``."""
        lm_eval = require_lm_eval("harness")
        from lm_eval.models.huggingface import HFLM

        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "harness: the tokenizer has no chat template; set harness.apply_chat_template="
                "false to prompt with plain text"
            )
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            # the template renders any BOS itself: tokenize its text as `evaluate` does
            add_bos_token=False if apply_chat_template else None,
            mixed_precision_dtype=mixed_precision_dtype,
        )
        with _no_environment_probe():
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=self.tasks,
                task_manager=self.manager,
                num_fewshot=num_fewshot,
                limit=limit,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=apply_chat_template,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=None if seed is None else 1234,
                torch_random_seed=None if seed is None else 1234,
            )
        return HarnessResult(flat_metrics(raw), dict(raw), self.version)


@dataclass
class HarnessResult:
    """Flat ``harness/<task>/<metric>`` values, lm-eval's raw results and its version."""

    metrics: dict[str, float]
    raw: dict[str, Any]
    lm_eval_version: str

    def summary(self) -> dict[str, Any]:
        """What ``eval-harness.json`` keeps of the raw results (no samples, no environment)."""
        keys = ("results", "groups", "group_subtasks", "configs", "n-shot", "n-samples")
        kept = {k: self.raw[k] for k in keys if k in self.raw}
        kept["higher_is_better"] = self.raw.get("higher_is_better", {})
        kept["versions"] = {"lm_eval": self.lm_eval_version, "tasks": self.raw.get("versions")}
        return {"metrics": self.metrics, **kept}


def flat_metrics(raw: Mapping[str, Any]) -> dict[str, float]:
    """``{"harness/<task>/<metric>[/<filter>]": value}`` of every task and group (no stderrs)."""
    flat: dict[str, float] = {}
    for task, values in raw.get("results", {}).items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool):
                continue  # "alias", "sample_len", ...: not metrics
            if not isinstance(value, int | float):
                continue
            name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            flat[f"harness/{task}/{name}"] = float(value)
    return flat


def table(raw: Mapping[str, Any]) -> str:
    """A compact text table: task, metric (filter), value ± stderr, examples."""
    rows = [("task", "metric", "value", "stderr", "n")]
    samples = raw.get("n-samples", {})
    for task, values in raw.get("results", {}).items():
        n = samples.get(task, {}).get("effective", "")
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            err = f"{stderr:.4f}" if isinstance(stderr, int | float) else ""
            rows.append((task, label, f"{value:.4f}", err, str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


# ----------------------------------------------------------------------------- evaluate
def evaluate_checkpoint_harness(
    model_path: Path,
    harness_cfg: Mapping[str, Any],
    dtype: str,
    harness: Harness | None = None,
) -> dict[str, Any]:
    """``harness_cfg`` (the ``harness`` section of ``evaluate``) on a saved checkpoint: the
    results JSON (default ``<model_path>/eval-harness.json``), printed as a table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from post_training.modeling.loading import torch_dtype

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"model_path {model_path}: no config.json (not a model checkpoint)")
    harness = harness or Harness(harness_cfg["tasks"], harness_cfg["include_path"])
    device = resolve_device(harness_cfg["device"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(dtype), use_safetensors=True
    ).to(device)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        result = harness.run(
            model,
            tokenizer,
            batch_size=harness_cfg["batch_size"],
            limit=harness_cfg["limit"],
            num_fewshot=harness_cfg["num_fewshot"],
            apply_chat_template=harness_cfg["apply_chat_template"],
        )
    seconds = time.perf_counter() - start
    settings = {k: harness_cfg[k] for k in ("limit", "batch_size", "num_fewshot")}
    settings.update(
        device=device, torch_dtype=dtype, apply_chat_template=harness_cfg["apply_chat_template"]
    )
    summary = {
        "model_path": str(model_path),
        "tasks": harness.names,
        "settings": settings,
        "seconds": round(seconds, 1),
        **result.summary(),
    }
    output = Path(harness_cfg["output_file"] or model_path / OUTPUT_FILE)
    atomic_write_json(output, summary, default=str)
    print(
        f"lm-eval {result.lm_eval_version} on {model_path} ({seconds:.0f} s):\n"
        f"{table(result.raw)}\nwritten to {output}",
        flush=True,
    )
    return summary


# ----------------------------------------------------------------------------- training
@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Python, NumPy and torch (CPU and current GPU) random states restored afterwards:
    lm-eval seeds them, and training must not notice it ran."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


_MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class HarnessCallback(TrainerCallback):
    """The harness every ``every`` optimizer steps and at the last step: on the main process
    (``harness`` is None on the others), on the unwrapped in-memory model in eval mode (then
    back to train mode, its ``use_cache`` restored), logged as ``harness/<task>/<metric>``."""

    def __init__(
        self,
        harness: Harness | None,
        every: int,
        limit: float | None,
        batch_size: int | str,
        mixed_precision: str = "no",
    ) -> None:
        self.harness = harness
        self.every = every
        self.limit = limit
        self.batch_size = batch_size
        self.mixed_precision_dtype = _MIXED_PRECISION_DTYPES.get(mixed_precision)
        self._tokenizer: Any = None

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    def on_step_end(self, trainer: Trainer, step: dict[str, float]) -> None:
        global_step = trainer.state.global_step
        if not self.due(global_step, trainer.state.total_steps):
            return
        accelerator = trainer.accelerator
        accelerator.wait_for_everyone()
        metrics = self.evaluate(trainer) if accelerator.is_main_process else {}
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics])[0]
        accelerator.wait_for_everyone()
        trainer.log(metrics, global_step)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """The harness on the trainer's model, as it is now (main process)."""
        assert self.harness is not None, "the harness runs on the main process only"
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self._tokenizer is None:  # lm-eval may set a pad token: not on the trainer's one
            self._tokenizer = copy.deepcopy(trainer.tokenizer)
        was_training = model.training
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        start = time.perf_counter()
        try:
            model.eval()
            if config is not None:
                config.use_cache = True
            with torch.no_grad(), _rng_preserved():
                result = self.harness.run(
                    model,
                    self._tokenizer,
                    batch_size=self.batch_size,
                    limit=self.limit,
                    mixed_precision_dtype=self.mixed_precision_dtype,
                    bootstrap_iters=0,  # point estimates only during training
                )
        finally:
            if config is not None:
                config.use_cache = use_cache
            model.train(was_training)
        values = result.metrics.items()
        summary = ", ".join(f"{k.removeprefix('harness/')} {v:.4f}" for k, v in values)
        log.info(
            "Harness at step %d (%.1f s): %s",
            trainer.state.global_step,
            time.perf_counter() - start,
            summary,
        )
        return result.metrics


def _check_unsharded(every: int) -> None:
    """The harness generates on the main process alone: sharded weights cannot."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    kind = state.distributed_type
    zero3 = (
        kind == DistributedType.DEEPSPEED and getattr(state.deepspeed_plugin, "zero_stage", 0) == 3
    )
    if kind == DistributedType.FSDP or zero3:
        raise ConfigError(
            f"evaluation.harness_every={every}: the harness generates on the main process only, "
            "which sharded weights (FSDP, DeepSpeed ZeRO-3) do not allow; run `python -m "
            "post_training.evaluate model_path=<checkpoint> harness.tasks=[...]` on saved "
            "checkpoints instead"
        )


def harness_callbacks(config: Mapping[str, Any]) -> list[TrainerCallback]:
    """``[HarnessCallback]`` when ``evaluation.harness_every`` > 0 (the tasks loaded now, on
    the main process, so that a bad task stops the run before training), else ``[]``."""
    evaluation = config.get("evaluation") or {}
    every = int(evaluation.get("harness_every") or 0)
    if every <= 0:
        return []
    from accelerate import PartialState

    _check_unsharded(every)
    tasks = list(evaluation.get("harness_tasks") or [])
    harness = (
        Harness(tasks, key="evaluation.harness_tasks") if PartialState().is_main_process else None
    )
    mixed = (config.get("training_args") or {}).get("mixed_precision", "no")
    return [
        HarnessCallback(
            harness,
            every,
            evaluation.get("harness_limit"),
            evaluation.get("harness_batch_size", 64),
            mixed,
        )
    ]
