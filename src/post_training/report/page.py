"""The HTML page of :mod:`post_training.report`: a summary table, per run its facts (dir,
entrypoint, model, trainer / loss, status, steps) and metric table (final, best, min, max), then
the figures by relative path. Plain HTML and CSS: no script, nothing fetched.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from post_training.report.figures import DrawnFigure, run_color
from post_training.report.runs import (
    BOOKKEEPING,
    EVAL_PREFIX,
    MAX_POINTS,
    STATUS_FILE,
    Run,
    fmt,
)


def _dig(config: dict[str, Any], *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def describe_trainer(config: dict[str, Any]) -> str:
    """``<trainer.name>`` plus its ``loss_type`` when it has one (``dpo (sigmoid)``)."""
    name = _dig(config, "trainer", "name")
    if not name:
        return "–"
    loss_type = _dig(config, "trainer", "loss_type")
    return f"{name} ({loss_type})" if loss_type else str(name)


def describe_model(config: dict[str, Any]) -> str:
    name = _dig(config, "model", "name")
    path = _dig(config, "model", "model_name_or_path")
    parts = [str(p) for p in (name, path) if p]
    return " — ".join(dict.fromkeys(parts)) or "–"


def describe_status(run: Run) -> str:
    if run.status_problem:
        return run.status_problem
    status = run.status
    if status is None:
        return f"unknown (no {STATUS_FILE})"
    text = str(status.get("state", "?"))
    if status.get("exit_code") is not None:
        text += f", exit code {status['exit_code']}"
    if status.get("started"):
        text += f"; started {status['started']}"
    if status.get("ended"):
        text += f", ended {status['ended']}"
    if status.get("error"):
        text += f"; error: {status['error']}"
    return text


def describe_steps(run: Run) -> str:
    last = run.last_step
    if run.status and isinstance(run.status.get("last_step"), int):
        last = max(last or 0, run.status["last_step"])
    total = _dig(run.config, "training_args", "max_steps")
    text = "none logged" if last is None else f"last step {last}"
    if isinstance(total, int) and not isinstance(total, bool):
        text += f" of max_steps {total}"
    text += f"; {run.records} logged records"
    if run.first_time is not None and run.last_time is not None:
        text += f" over {run.last_time - run.first_time:.0f} s"
    return text


def describe_lines(run: Run) -> str | None:
    notes = []
    if run.bad_lines:
        shown = ", ".join(map(str, run.bad_lines[:5])) + (", ..." if len(run.bad_lines) > 5 else "")
        notes.append(f"{len(run.bad_lines)} unreadable line(s) skipped (line {shown})")
    if run.last_line_truncated:
        notes.append("the last line is truncated (the run was killed while writing?)")
    if run.blank_lines:
        notes.append(f"{run.blank_lines} blank line(s)")
    if run.thinned:
        notes.append(f"long series thinned to at most {MAX_POINTS} points for the plots")
    return "; ".join(notes) or None


def metric_rows(run: Run) -> list[list[str]]:
    """One table row per logged key: final (step), best (step), min, max, points, non-finite."""

    def order(key: str) -> tuple[int, str, bool]:
        base = key.removeprefix(EVAL_PREFIX)
        rank = 0 if base == "loss" else 2 if key in BOOKKEEPING else 1
        return rank, base, key.startswith(EVAL_PREFIX)

    rows = []
    for key in sorted(run.series, key=order):
        series = run.series[key]
        best = series.best(key)
        last = series.last
        rows.append(
            [
                key,
                fmt(last[1]) if last else "–",
                fmt(last[0]) if last else "–",
                fmt(best[0]) if best else "–",
                fmt(best[1]) if best else "–",
                fmt(series.min[0]) if series.min else "–",
                fmt(series.max[0]) if series.max else "–",
                str(series.count),
                str(series.nonfinite) if series.nonfinite else "",
            ]
        )
    return rows


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 1.6em; height: 0.8em; margin-right: 0.4em; }
.note { color: #a40; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
"""


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    """An HTML table; ``rows`` hold HTML (escape text first), columns from ``numeric_from`` on
    are right-aligned numbers."""
    head = (
        "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


SUMMARY_COLUMNS = (
    ("final loss", "loss", "last"),
    ("best eval_loss", "eval_loss", "best"),
    ("eval_accuracy", "eval_accuracy", "last"),
    ("final rewards/accuracies", "rewards/accuracies", "last"),
    ("final rewards/margins", "rewards/margins", "last"),
    ("tokens/s (last)", "tokens_per_second", "last"),
    ("peak memory GB", "peak_memory_gb", "max"),
)
"""The summary table's columns (title, key, which value), each shown when some run logged it."""


def _summary_value(run: Run, key: str, which: str) -> str:
    series = run.series.get(key)
    if series is None:
        return "–"
    value = {"last": series.last, "best": series.best(key), "max": series.max}[which]
    if value is None:
        return "–"
    return fmt(value[1] if which == "last" else value[0])


def _swatch(index: int) -> str:
    return f'<span class="swatch" style="background:{run_color(index)}"></span>'


def render_html(runs: Sequence[Run], figures: Sequence[DrawnFigure]) -> str:
    """The report page: runs (with their colours), their metric tables, then the figures."""
    esc = html.escape
    title = "Training report: " + ", ".join(r.label for r in runs)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by "
        "<code>python -m post_training.report</code>; x axis: optimizer step.</p>",
        "<h2>Summary</h2>",
    ]
    columns = [c for c in SUMMARY_COLUMNS if any(c[1] in run.series for run in runs)]
    summary = []
    for i, run in enumerate(runs):
        cells = [
            str(run.status.get("state", "?")) if run.status else "–",
            fmt(run.last_step) if run.last_step is not None else "–",
            *(_summary_value(run, key, which) for _, key, which in columns),
        ]
        summary.append([_swatch(i) + esc(run.label), *map(esc, cells)])
    header = ["run", "state", "last step", *(c[0] for c in columns)]
    parts.append(_table(header, summary, 2))
    parts.append("<h2>Runs</h2>")
    for i, run in enumerate(runs):
        info = [
            ["dir", str(run.path)],
            ["entrypoint", str(run.config.get("entrypoint") or "–")],
            ["model", describe_model(run.config)],
            ["trainer / loss", describe_trainer(run.config)],
            ["status", describe_status(run)],
            ["steps", describe_steps(run)],
        ]
        parts.append(f"<h3>{_swatch(i)}{esc(run.label)}</h3>")
        parts.append(_table(None, [[esc(c) for c in row] for row in info], 99))
        note = describe_lines(run)
        if note:
            parts.append(f'<p class="note">{esc(note)}</p>')
        if run.series:
            header = ["metric", "final", "at step", "best", "at step", "min", "max", "points"]
            rows = metric_rows(run)
            if any(r[-1] for r in rows):
                header.append("non-finite")
            else:
                rows = [r[:-1] for r in rows]
            cells = [[esc(c) for c in row] for row in rows]
            parts.append(
                f"<details{' open' if len(runs) == 1 else ''}><summary>{len(rows)} metrics: "
                "final, best, min, max</summary>"
                f"{_table(header, cells, 1)}</details>"
            )
        else:
            parts.append('<p class="note">No metrics logged yet.</p>')
    parts.append("<h2>Figures</h2>")
    if not figures:
        parts.append("<p>Nothing to plot.</p>")
    for figure in figures:
        caption = figure.title
        if len(figure.panels) > 1:
            caption += ": " + ", ".join(figure.panels)
        parts.append(
            f'<figure id="{esc(figure.name)}"><img src="{esc(figure.file)}" '
            f'alt="{esc(figure.title)}"><figcaption>{esc(caption)}</figcaption></figure>'
        )
        if figure.skipped_panels:
            parts.append(
                f'<p class="note">Not drawn ({len(figure.skipped_panels)} more panels): '
                f"{esc(', '.join(figure.skipped_panels))}</p>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
