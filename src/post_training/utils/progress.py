"""What a person watching a run sees: one compact line per logging step, a bar on a terminal.

Training prints, every ``logging_steps`` (and at least every ``interval_s`` seconds)::

    step 120/2500 (4.8%) | loss 0.412 | lr 9.6e-04 | grad 0.83 | 1,210 tok/s | eta 3m41s

plus ``eval step 200 | eval_loss 0.391 | ...`` when an evaluation runs; preference trainers add
their reward metrics (``margin``, ``acc``). Loops over items (tokenizing, generating, scoring a
partition) print ``<what>: 1,200/5,000 rows (24.0%) | 85 rows/s | eta 44s`` through
:class:`ItemProgress`. Lines go through :mod:`logging` (logger ``post_training.progress``), so
they reach the console and the job log (``<run dir>/<entrypoint>.log``) alike. When stdout is a
terminal, a ``tqdm`` bar is drawn under them (``logging_redirect_tqdm`` keeps the lines above it).

:func:`silence_known_warnings` drops library warnings that are known to be harmless and would
otherwise repeat at every save.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("post_training.progress")

DEFAULT_INTERVAL_S = float(os.environ.get("POST_TRAINING_PROGRESS_INTERVAL_S", 10.0))
"""At least this often a line while something runs (env ``POST_TRAINING_PROGRESS_INTERVAL_S``)."""

# The reward metrics shown on a preference trainer's line: metric key -> short label.
PREFERENCE_KEYS = {
    "rewards/margins": "margin",
    "rewards/accuracies": "acc",
    "kl": "kl",  # KTO's reference point z₀
    "accuracy": "acc",  # a reward model's (train_reward)
}


def format_duration(seconds: float) -> str:
    """``42s``, ``3m41s``, ``2h05m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_number(value: Any) -> str:
    """A metric value in 3-4 significant digits (``0.412``, ``9.6e-04``, ``1,210``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude == 0 or magnitude >= 0.01:
        return f"{value:.4g}" if magnitude < 100 else f"{value:.1f}"
    return f"{value:.1e}"


def train_line(
    step: int, total: int, metrics: Mapping[str, Any], eta_s: float, interim: bool = False
) -> str:
    """The line of one training log (``interim``: between logging steps, the window so far)."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.1f}%)"]
    if "loss" in metrics:
        parts.append(f"loss {format_number(metrics['loss'])}")
    for key, label in PREFERENCE_KEYS.items():
        if key in metrics:
            parts.append(f"{label} {format_number(metrics[key])}")
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.1e}")
    if "grad_norm" in metrics:
        parts.append(f"grad {format_number(metrics['grad_norm'])}")
    if "tokens_per_second" in metrics:
        parts.append(f"{metrics['tokens_per_second']:,.0f} tok/s")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts) + (" (running)" if interim else "")


def eval_line(step: int, metrics: Mapping[str, Any]) -> str:
    """``eval step 200 | eval_loss 0.391 | eval_rewards/margins 0.8``: every metric it holds."""
    shown = [f"{k} {format_number(v)}" for k, v in metrics.items() if k not in {"step", "time"}]
    return " | ".join([f"eval step {step}", *shown])


def launch_rank() -> int:
    """This process's global rank under torchrun / accelerate / SLURM (0 when alone)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class TrainProgress:
    """Progress of one training launch: lines at logging steps (and every ``interval_s`` when
    logging steps are far apart), a bar on a terminal. Only the main process shows anything."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        interval_s: float = DEFAULT_INTERVAL_S,
        bar: bool | None = None,
    ) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.interval_s = interval_s
        self.started = time.perf_counter()
        self.last_line = self.started
        self._bar = None
        if enabled and (stdout_is_terminal() if bar is None else bar):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False
            )

    def eta_s(self, step: int) -> float:
        """Seconds left at ``step``, from the mean step time of this launch."""
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def interim_due(self) -> bool:
        return self.enabled and time.perf_counter() - self.last_line >= self.interval_s

    def train(self, step: int, metrics: Mapping[str, Any], interim: bool = False) -> None:
        if self.enabled:
            self._emit(train_line(step, self.total, metrics, self.eta_s(step), interim))

    def eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.enabled:
            self._emit(eval_line(step, metrics))

    def _emit(self, line: str) -> None:
        self.last_line = time.perf_counter()
        log.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @contextmanager
    def shown(self) -> Iterator[TrainProgress]:
        """The block in which the bar is drawn: console log lines are written above it."""
        try:
            if self._bar is None:
                yield self
                return
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                yield self
        finally:
            self.close()


_LABELS: list[str] = []


@contextmanager
def labelled(label: str) -> Iterator[None]:
    """Within the block, item progress lines start with ``label`` (e.g. the alignment stage and
    its partition: ``generate_ref_completions partition-00001-of-00004: generating: ...``)."""
    _LABELS.append(label)
    try:
        yield
    finally:
        _LABELS.pop()


class ItemProgress:
    """``<what>: 1,200/5,000 rows (24.0%) | 85 rows/s | eta 44s`` every ``interval_s`` seconds
    and once at the end (when the loop took longer than ``interval_s``), prefixed by the
    :func:`labelled` block it runs in."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "rows",
        enabled: bool | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        # default: rank 0 of the launch only (every rank runs the same loop on its shard)
        self.enabled = launch_rank() == 0 if enabled is None else enabled
        self.interval_s = interval_s
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self.lines = 0

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        share = 100 * self.done / self.total if self.total else 100.0
        tail = (
            f"eta {format_duration(eta)}"
            if self.done < self.total
            else f"done in {format_duration(elapsed)}"
        )
        prefix = "".join(f"{label}: " for label in _LABELS)
        return (
            f"{prefix}{self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.1f}%) | "
            f"{format_number(rate)} {self.unit}/s | {tail}"
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last_line >= self.interval_s and self.done < self.total:
            self._emit(now)

    def finish(self) -> None:
        """The closing line, when the loop was long enough to have shown progress."""
        if self.enabled and (self.lines or time.perf_counter() - self.started >= self.interval_s):
            self.done = max(self.done, self.total)
            self._emit(time.perf_counter())

    def _emit(self, now: float) -> None:
        self.last_line = now
        self.lines += 1
        log.info(self.line())


# ------------------------------------------------------------------------------ warnings
KNOWN_HARMLESS = (
    # accelerate's save_state of a model with tied input/output embeddings: the tie is restored
    # on load (tie_word_embeddings), so the dropped duplicate is never missing.
    "Removed shared tensor",
)


class _DropKnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in KNOWN_HARMLESS)


_FILTER = _DropKnownHarmless()


def silence_known_warnings() -> None:
    """Drop the known-harmless library warnings (:data:`KNOWN_HARMLESS`), and the libraries'
    own progress bars when stdout is not a terminal (in a log file each is a line of noise
    per save or load); idempotent."""
    for name in ("accelerate.utils.other", "accelerate"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not stdout_is_terminal():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()
