"""Plots of training runs: a self-contained ``report.html`` with PNG figures, from the files every
run dir holds (``metrics.jsonl``, ``config.yaml``, ``status.json``).

    python -m post_training.report <run dir> [<run dir> ...] [--out DIR] [--labels a,b]

One run: the report goes into the run dir itself. Several runs are overlaid on the same axes (one
colour per run, named in each figure's legend) and the report goes to ``--out``, by default
``./report-<timestamp>`` in the current directory. The output dir holds ``report.html`` and
``report-plots/*.png`` (referenced by relative path): copy the two together. A run's label is
``<job_subdir>/<run timestamp>`` unless ``--labels`` names them.

Figures, each only when some run logged its keys (x axis: optimizer step; a training key ``K`` is
drawn with its eval counterpart ``eval_K`` dashed on the same axes): ``loss``; ``preference``
(``rewards/*``, ``logps/*``, ``logits/*``); ``qrpo`` (quantile rewards, targets, ``β·logZ``, β,
per-side residuals, capped / clamped fractions); ``training_metrics``, the trainer's other keys
(SFT's loss components and accuracies, IRL's TD loss, ...); ``eval_metrics``, the other eval keys
logged more than once; ``final_eval``, bars of those logged once (the end-of-run exact match
``eval_accuracy`` and ``eval_accuracy/<task>``); ``learning_rate``; ``grad_norm``; ``throughput``
(tokens/s, TFLOP/s, MFU); ``memory`` (peak GB). Modules: :mod:`~post_training.report.runs`
(reading), :mod:`~post_training.report.figures`, :mod:`~post_training.report.page`.
The page lists per run its dir, entrypoint, model, trainer / loss, status and steps, and a table
of each metric's final, best, minimum and maximum values.

The reader is robust to what a killed or odd run leaves: blank lines and an unreadable (truncated)
line are skipped and counted, ``"nan"`` / ``"inf"`` values are kept (drawn as gaps, their steps
marked ``x`` along the bottom of the axes), huge files are streamed and each series is thinned
to at most :data:`MAX_POINTS` points (its final value and extremes are taken over all points).

:func:`write_report` is the function a training entrypoint calls at the end of a run: it imports
matplotlib lazily (its Agg canvas only, no pyplot, so no global backend is switched) and never
touches torch or CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from post_training.report.figures import COLORS, MAX_PANELS, draw_figures, run_color
from post_training.report.page import render_html
from post_training.report.runs import (
    MAX_POINTS,
    METRICS_FILE,
    ReportError,
    Run,
    Series,
    read_run,
    read_runs,
    resolve_run_dir,
)
from post_training.utils.atomic import atomic_write_text

REPORT_FILE = "report.html"
PLOTS_DIR = "report-plots"

__all__ = [
    "COLORS",
    "MAX_PANELS",
    "MAX_POINTS",
    "METRICS_FILE",
    "PLOTS_DIR",
    "REPORT_FILE",
    "ReportError",
    "Run",
    "Series",
    "main",
    "read_run",
    "read_runs",
    "run_color",
    "write_report",
]


def write_report(
    run_dirs: Sequence[Path], out_dir: Path, labels: Sequence[str] | None = None
) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/report-plots/*.png`` for ``run_dirs`` (their
    curves overlaid, one colour per run, labelled ``labels`` or ``<job_subdir>/<timestamp>``);
    returns the HTML's path. Raises :class:`ReportError` (one line) for a path that is not a run
    dir or labels that do not match. Imports matplotlib only here; never touches torch."""
    runs = read_runs([Path(p) for p in run_dirs], labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(runs, out_dir / PLOTS_DIR)
    path = out_dir / REPORT_FILE
    atomic_write_text(path, render_html(runs, figures))
    return path


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """The run dir for one run; ``./report-<timestamp>`` for several."""
    if len(run_dirs) == 1:
        return resolve_run_dir(Path(run_dirs[0]))
    return Path.cwd() / f"report-{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m post_training.report",
        description="Plot training runs (metrics.jsonl) into report.html + PNGs.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run dirs (…/runs/<timestamp>)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output dir (default: the run dir for one run, ./report-<timestamp> for several)",
    )
    parser.add_argument(
        "--labels", default=None, help="comma-separated legend labels, one per run dir"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels is not None else None
    try:
        out = args.out if args.out is not None else default_out_dir(args.run_dirs)
        path = write_report(args.run_dirs, out, labels)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:
        print(f"error: cannot write the report: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"Report: {path}", flush=True)
    return 0
