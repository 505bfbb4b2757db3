"""The figures of :mod:`post_training.report`: which panels the logged keys call for, and their
drawing into PNGs with matplotlib's Agg canvas (imported lazily, no pyplot: no global backend is
switched, no figure outlives its file).

One colour per run (:data:`COLORS`), one line style per key on an axes: training keys solid
(dotted, ...), their ``eval_`` twins dashed with markers. A fixed grid in inches, not a layout
engine: constrained layout doubles the drawing time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from post_training.report.runs import BOOKKEEPING, EVAL_PREFIX, Run, Series, fmt

MAX_PANELS = 30
"""Panels per figure; the rest are listed in the report, not drawn."""
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""One colour per run, in order (matplotlib's tab10, fixed here so rcParams cannot change it)."""
TRAIN_STYLES = (("-", ""), (":", "s"), ("-.", "^"), ((0, (5, 1, 1, 1)), "D"))
"""Line style and marker of the n-th training key on one axes."""
EVAL_STYLES = (("--", "o"), ("--", "v"), ("--", "P"), ("--", "X"))
"""Line style and marker of the n-th eval key on one axes: eval curves are dashed."""
MARKERS_PER_LINE = 15
NICE_STEPS = (1, 2, 2.5, 5, 10)  # tick spacings (times a power of ten)


def run_color(index: int) -> str:
    """The colour of the ``index``-th run (0-based) in every figure and in the page."""
    return COLORS[index % len(COLORS)]


@dataclass(frozen=True)
class Panel:
    """One axes: its title and the training keys drawn on it (each with its ``eval_`` twin)."""

    title: str
    keys: tuple[str, ...]
    log_scale: bool = False  # log y when the values are positive and span three decades
    bars: bool = False  # one bar per key and run (metrics logged once, e.g. at the end)


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem
    title: str
    panels: tuple[Panel, ...]


def _panels(*keys: str) -> tuple[Panel, ...]:
    return tuple(Panel(k, (k,)) for k in keys)


LOSS = FigureSpec("loss", "Loss (training, and eval dashed)", (Panel("loss", ("loss",)),))
PREFERENCE = FigureSpec(
    "preference",
    "Preference metrics",
    (
        *_panels("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
        Panel("logps", ("logps/chosen", "logps/rejected")),
        Panel("logits (mean)", ("logits/chosen", "logits/rejected")),
    ),
)
QRPO = FigureSpec(
    "qrpo",
    "QRPO: quantile rewards and regression targets",
    (
        Panel("quantile rewards", ("quantile_rewards/chosen", "quantile_rewards/rejected")),
        Panel("quantile reward margin", ("quantile_rewards/margins",)),
        Panel("targets (reward − β·logZ)", ("targets/chosen", "targets/rejected")),
        Panel("β·logZ", ("beta_log_z", "beta_log_z/chosen", "beta_log_z/rejected")),
        Panel("β", ("beta/chosen", "beta/rejected")),
        Panel("squared residual", ("loss/chosen", "loss/rejected")),
        Panel("fractions", ("beta_capped_fraction", "quantile_clamped_fraction")),
    ),
)
TAIL = (
    FigureSpec("learning_rate", "Learning rate", (Panel("learning rate", ("learning_rate",)),)),
    FigureSpec("grad_norm", "Gradient norm", (Panel("grad norm", ("grad_norm",), True),)),
    FigureSpec(
        "throughput",
        "Throughput",
        (
            Panel("tokens / s", ("tokens_per_second",)),
            Panel("TFLOP/s per device", ("perf/tflops",)),
            Panel("MFU", ("perf/mfu",)),
        ),
    ),
    FigureSpec("memory", "Peak memory", (Panel("peak memory (GB)", ("peak_memory_gb",)),)),
)
STATIC_FIGURES = (LOSS, PREFERENCE, QRPO, *TAIL)


def figure_specs(runs: Sequence[Run]) -> list[FigureSpec]:
    """The figures to draw for what ``runs`` logged: the fixed ones, then one panel per other
    training metric (with its eval twin), then one per remaining eval metric; eval metrics that
    no run logged more than once (the end-of-run exact match) share one bar panel."""
    keys = {k for run in runs for k in run.series}
    claimed = {k for spec in STATIC_FIGURES for p in spec.panels for k in p.keys}
    claimed |= {EVAL_PREFIX + k for k in claimed}
    others = sorted(k for k in keys - claimed - BOOKKEEPING if not k.startswith(EVAL_PREFIX))
    claimed |= {EVAL_PREFIX + k for k in others}
    evals = sorted(k for k in keys - claimed if k.startswith(EVAL_PREFIX))
    once = [k for k in evals if all(r.series[k].count <= 1 for r in runs if k in r.series)]
    final = (Panel("logged once: the value of each run", tuple(once), bars=True),) if once else ()
    specs = [
        LOSS,
        PREFERENCE,
        QRPO,
        FigureSpec("training_metrics", "Other training metrics (eval dashed)", _panels(*others)),
        FigureSpec("eval_metrics", "Evaluation metrics", _panels(*sorted(set(evals) - set(once)))),
        FigureSpec("final_eval", "End-of-run evaluation", final),
        *TAIL,
    ]
    out = []
    for spec in specs:
        panels = tuple(p for p in spec.panels if _panel_keys(p, keys))
        if panels:
            out.append(FigureSpec(spec.name, spec.title, panels))
    return out


def _panel_keys(panel: Panel, keys: set[str]) -> list[str]:
    """The panel's keys that were logged: training keys, then their eval twins."""
    train = [k for k in panel.keys if k in keys]
    if panel.bars:
        return train
    evals = [
        EVAL_PREFIX + k
        for k in panel.keys
        if EVAL_PREFIX + k in keys and not k.startswith(EVAL_PREFIX)
    ]
    return train + evals


@dataclass
class DrawnFigure:
    name: str
    title: str
    file: str  # relative to the report dir
    panels: list[str]
    skipped_panels: list[str]


def _plot_arrays(series: Series) -> tuple[Any, Any]:
    import numpy as np

    steps, values = series.points()
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    y[~np.isfinite(y)] = np.nan  # a gap; the step is marked separately
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def _draw_bars(ax: Any, panel: Panel, runs: Sequence[Run], keys: list[str]) -> None:
    """Horizontal bars: one group per key (top to bottom), one bar per run in its colour."""
    height = 0.8 / len(runs)
    for index, run in enumerate(runs):
        for n, key in enumerate(keys):
            series = run.series.get(key)
            if series is None or series.last is None or not math.isfinite(series.last[1]):
                continue
            y = n + (index - (len(runs) - 1) / 2) * height
            value = series.last[1]
            ax.barh(y, value, height=height * 0.9, color=run_color(index))
            ax.annotate(
                f" {fmt(value)}", (value, y), va="center", fontsize=7, annotation_clip=False
            )
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_title(panel.title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)


def _styles(keys: Sequence[str]) -> list[tuple[Any, str]]:
    """(line style, marker) of each key on one axes: training keys solid, dotted, ...; eval
    keys dashed, each with its own marker."""
    train = [k for k in keys if not k.startswith(EVAL_PREFIX)]
    out = []
    for key in keys:
        if key.startswith(EVAL_PREFIX):
            n = keys.index(key) - len(train)
            out.append(EVAL_STYLES[n % len(EVAL_STYLES)])
        else:
            out.append(TRAIN_STYLES[train.index(key) % len(TRAIN_STYLES)])
    return out


def _draw_panel(ax: Any, panel: Panel, runs: Sequence[Run], keys: list[str]) -> None:
    if panel.bars:
        _draw_bars(ax, panel, runs, keys)
        return
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    styles = _styles(keys)
    positive = True
    lows, highs = [], []
    points = 0
    for index, run in enumerate(runs):
        color = run_color(index)
        for key, (linestyle, marker) in zip(keys, styles, strict=True):
            series = run.series.get(key)
            if series is None:
                continue
            x, y = _plot_arrays(series)
            points += len(x)
            if len(x) <= 30 and not marker:
                marker = "o"
            ax.plot(
                x,
                y,
                color=color,
                linestyle=linestyle,
                marker=marker or None,
                markevery=max(1, len(x) // MARKERS_PER_LINE) if len(x) > 30 else None,
                markersize=4,
                linewidth=1.6,
            )
            if series.nonfinite_steps:
                ax.plot(
                    series.nonfinite_steps,
                    [0.03] * len(series.nonfinite_steps),
                    "x",
                    color=color,
                    markersize=7,
                    transform=bottom,
                    clip_on=False,
                )
            if series.min is not None and series.max is not None:
                lows.append(series.min[0])
                highs.append(series.max[0])
                positive = positive and series.min[0] > 0
    if panel.log_scale and positive and lows and max(highs) > 1000 * min(lows):
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(6, steps=NICE_STEPS))
    ax.xaxis.set_major_locator(MaxNLocator(6, steps=NICE_STEPS, integer=True))
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(keys) > 1:
        handles = [
            Line2D([], [], color="0.3", linestyle=style, marker=marker or None, markersize=4)
            for style, marker in styles
        ]
        # "best" looks at every point: slow on long series
        ax.legend(handles, keys, fontsize=7, loc="best" if points < 4000 else "upper right")


@dataclass(frozen=True)
class Layout:
    """A fixed grid in inches (no layout engine: constrained layout doubles the drawing time)."""

    rows: int
    cols: int
    axes_w: float
    axes_h: float
    left: float = 0.8
    right: float = 0.3
    top: float = 0.7  # the figure title and the first row's panel titles
    bottom: float = 0.55  # the last row's x label, plus the run legend
    gap_w: float = 0.85
    gap_h: float = 0.85

    @property
    def size(self) -> tuple[float, float]:
        width = self.left + self.right + self.cols * self.axes_w + (self.cols - 1) * self.gap_w
        height = self.top + self.bottom + self.rows * self.axes_h + (self.rows - 1) * self.gap_h
        return width, height

    def gridspec(self) -> dict[str, float]:
        width, height = self.size
        return {
            "left": self.left / width,
            "right": 1 - self.right / width,
            "top": 1 - self.top / height,
            "bottom": self.bottom / height,
            "wspace": self.gap_w / self.axes_w,
            "hspace": self.gap_h / self.axes_h,
        }


def layout(panels: Sequence[Panel], runs: Sequence[Run]) -> Layout:
    """The grid of a figure: up to three panels a row; a bar panel as wide as its labels."""
    legend = 0.3 * math.ceil(len(runs) / 3) + 0.1 if len(runs) > 1 else 0.0
    if len(panels) == 1 and panels[0].bars:
        keys = panels[0].keys
        return Layout(
            1,
            1,
            6.0,
            max(2.2, 0.28 * len(keys) * max(1.0, 0.6 * len(runs))),
            left=0.3 + 0.075 * max(len(k) for k in keys),
            bottom=0.45 + legend,
        )
    if len(panels) == 1:
        return Layout(1, 1, 6.5, 3.2, bottom=0.55 + legend)
    cols = min(3, len(panels))
    return Layout(math.ceil(len(panels) / cols), cols, 4.0, 2.5, bottom=0.55 + legend)


def draw_figure(spec: FigureSpec, runs: Sequence[Run], path: Path) -> DrawnFigure:
    """Draw ``spec`` (its panels that have data) for ``runs`` into the PNG ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = list(spec.panels[:MAX_PANELS])
    skipped = [p.title for p in spec.panels[MAX_PANELS:]]
    grid = layout(panels, runs)
    fig = Figure(figsize=grid.size, dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(grid.rows, grid.cols, squeeze=False, gridspec_kw=grid.gridspec()).ravel()
    logged = {k for run in runs for k in run.series}
    keys: set[str] = set()
    for ax, panel in zip(axes, panels, strict=False):
        panel_keys = _panel_keys(panel, logged)
        keys.update(panel_keys)
        _draw_panel(ax, panel, runs, panel_keys)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle(spec.title, fontsize=12, y=1 - 0.12 / grid.size[1], va="top")
    present = [i for i, run in enumerate(runs) if keys & set(run.series)]
    if len(runs) > 1:
        handles = [Line2D([], [], color=run_color(i), linewidth=2.5) for i in present]
        fig.legend(
            handles,
            [runs[i].label for i in present],
            loc="lower center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=min(len(runs), 3),
            fontsize=8,
            frameon=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return DrawnFigure(
        spec.name, spec.title, f"{path.parent.name}/{path.name}", [p.title for p in panels], skipped
    )


def draw_figures(runs: Sequence[Run], plots_dir: Path) -> list[DrawnFigure]:
    """Every figure with data, written as ``plots_dir/<name>.png``; stale PNGs of an earlier
    report in ``plots_dir`` are removed."""
    drawn = [draw_figure(spec, runs, plots_dir / f"{spec.name}.png") for spec in figure_specs(runs)]
    written = {Path(d.file).name for d in drawn}
    if plots_dir.is_dir():
        for old in plots_dir.glob("*.png"):
            if old.name not in written:
                old.unlink(missing_ok=True)
    return drawn
