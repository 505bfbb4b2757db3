"""Reading a run dir for :mod:`post_training.report`: ``metrics.jsonl`` streamed into thinned
series with exact summaries, ``config.yaml`` and ``status.json``.

Robust to what a killed or odd run leaves: blank lines and unreadable (truncated) lines are
skipped and counted, ``"nan"`` / ``"inf"`` values are kept as floats, and each series keeps at
most :data:`MAX_POINTS` points of a huge file (every k-th, k doubling as the file grows) while its
final value and extremes are taken over all points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from post_training.errors import ProjectError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
MAX_POINTS = 2000
"""At most this many points per series are kept (every k-th, k doubling as the file grows)."""
MAX_MARKED_NONFINITE = 50
"""Steps of non-finite values remembered per series (marked on the plots)."""
BOOKKEEPING = frozenset({"step", "time", "epoch", "num_tokens", "num_samples"})
"""Keys tabulated but never plotted on their own (counters, not metrics)."""
EVAL_PREFIX = "eval_"


class ReportError(ProjectError):
    """A path that is not a run dir, labels that do not match the runs, ...: one line."""


def parse_value(value: Any) -> float | None:
    """A metric value as a float: numbers, and the strings ``nan`` / ``inf`` / ``-inf`` that
    non-finite values are logged as; None for anything else (text, lists, booleans)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in {"nan", "inf", "-inf", "+inf"}:
        return float(value.strip())
    return None


@dataclass
class Series:
    """One metric of one run: a thinned copy of its points plus exact summary statistics."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    stride: int = 1
    count: int = 0
    nonfinite: int = 0
    nonfinite_steps: list[float] = field(default_factory=list)
    last: tuple[float, float] | None = None
    min: tuple[float, float] | None = None  # (value, step) over the finite values
    max: tuple[float, float] | None = None

    def add(self, step: float, value: float) -> None:
        """Record ``value`` at ``step`` (in file order)."""
        if math.isfinite(value):
            if self.min is None or value < self.min[0]:
                self.min = (value, step)
            if self.max is None or value > self.max[0]:
                self.max = (value, step)
        else:
            self.nonfinite += 1
            if len(self.nonfinite_steps) < MAX_MARKED_NONFINITE:
                self.nonfinite_steps.append(step)
        if self.count % self.stride == 0:
            self.steps.append(step)
            self.values.append(value)
            if len(self.steps) >= MAX_POINTS:  # keep every other point: those at 2·stride
                del self.steps[1::2], self.values[1::2]
                self.stride *= 2
        self.count += 1
        self.last = (step, value)

    def points(self) -> tuple[list[float], list[float]]:
        """The kept points, always ending with the last one logged."""
        steps, values = list(self.steps), list(self.values)
        if self.last is not None and (self.count - 1) % self.stride != 0:
            steps.append(self.last[0])
            values.append(self.last[1])
        return steps, values

    def best(self, key: str) -> tuple[float, float] | None:
        """(value, step) of the best finite value, if the key says which way is better."""
        way = better(key)
        if way == "min":
            return self.min
        if way == "max":
            return self.max
        return None


def better(key: str) -> str | None:
    """``min`` or ``max``: which way a metric improves, guessed from its name; None if unknown."""
    name = key.removeprefix(EVAL_PREFIX).lower()
    if any(word in name for word in ("loss", "perplexity", "nll")):
        return "min"
    if any(word in name for word in ("accurac", "exact_match", "margins", "mfu", "per_second")):
        return "max"
    return None


@dataclass
class Run:
    """What one run dir holds, read."""

    path: Path
    label: str
    config: dict[str, Any]
    status: dict[str, Any] | None
    status_problem: str | None
    series: dict[str, Series]
    records: int
    blank_lines: int
    bad_lines: list[int]  # 1-based numbers of the lines that are not a JSON object with a step
    last_line_truncated: bool
    first_time: float | None
    last_time: float | None

    @property
    def last_step(self) -> int | None:
        steps = [s.last[0] for s in self.series.values() if s.last is not None]
        return int(max(steps)) if steps else None

    @property
    def thinned(self) -> bool:
        return any(s.stride > 1 for s in self.series.values())


def resolve_run_dir(path: Path) -> Path:
    """``path`` as a run dir (a ``metrics.jsonl`` given by name means its dir); ReportError with
    one line naming what is wrong otherwise."""
    path = Path(path)
    if path.name == METRICS_FILE and path.is_file():
        return path.parent
    if not path.exists():
        raise ReportError(f"{path}: no such directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a run dir (a run dir holds {METRICS_FILE})")
    if not (path / METRICS_FILE).is_file():
        hint = ""
        runs = path / "runs"
        if runs.is_dir():
            names = sorted(p.name for p in runs.iterdir() if (p / METRICS_FILE).is_file())
            if names:
                hint = f"; it is a job dir: pass one of its runs, e.g. {runs / names[-1]}"
        raise ReportError(f"{path}: not a run dir (no {METRICS_FILE}){hint}")
    return path


def iter_records(path: Path, counts: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``metrics.jsonl``, streamed; blank and unreadable lines are counted in
    ``counts`` (``blank``, ``bad``: line numbers, ``truncated``: the last line lacks its end)."""
    counts.update(blank=0, bad=[], truncated=False)
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        number = 0
        for number, line in enumerate(handle, 1):
            text = line.strip()
            if not text:
                counts["blank"] += 1
                continue
            try:
                record = json.loads(text)
            except ValueError:
                counts["bad"].append(number)
                counts["truncated"] = not line.endswith("\n")
                continue
            if not isinstance(record, dict) or parse_value(record.get("step")) is None:
                counts["bad"].append(number)
                continue
            counts["truncated"] = False
            yield record


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except (yaml.YAMLError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_status(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (ValueError, OSError) as err:
        return None, f"unreadable {STATUS_FILE}: {err}"
    if not isinstance(data, dict):
        return None, f"unreadable {STATUS_FILE}: not a JSON object"
    from post_training.utils.run_status import died

    if died(data):  # killed outright: the file still says running
        data = {**data, "state": "died"}
    return data, None


def default_label(path: Path, config: dict[str, Any]) -> str:
    """``<job_subdir>/<run timestamp>``: the job from the config, else from the path
    (``.../<job>/runs/<timestamp>``)."""
    job = config.get("job_subdir")
    if not job:
        job = path.parent.parent.name if path.parent.name == "runs" else path.parent.name
    return f"{job}/{path.name}"


def read_run(path: Path, label: str | None = None) -> Run:
    """Read one run dir (see :func:`resolve_run_dir` for what counts as one)."""
    path = resolve_run_dir(path).resolve()
    config = _read_yaml(path / CONFIG_FILE)
    status, status_problem = _read_status(path / STATUS_FILE)
    series: dict[str, Series] = {}
    counts: dict[str, Any] = {}
    records = 0
    first_time = last_time = None
    for record in iter_records(path / METRICS_FILE, counts):
        records += 1
        step = parse_value(record["step"])
        assert step is not None  # iter_records checked it
        for key, raw in record.items():
            if key == "step":
                continue
            value = parse_value(raw)
            if value is None:
                continue
            if key == "time":
                if math.isfinite(value):
                    first_time = value if first_time is None else min(first_time, value)
                    last_time = value if last_time is None else max(last_time, value)
                continue
            series.setdefault(key, Series()).add(step, value)
    return Run(
        path=path,
        label=label or default_label(path, config),
        config=config,
        status=status,
        status_problem=status_problem,
        series=series,
        records=records,
        blank_lines=counts["blank"],
        bad_lines=counts["bad"],
        last_line_truncated=counts["truncated"],
        first_time=first_time,
        last_time=last_time,
    )


def read_runs(run_dirs: Sequence[Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Every run dir read, checked first (one line for the first bad path); duplicate labels
    get a ``#n`` suffix."""
    if not run_dirs:
        raise ReportError("no run dir given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ReportError(f"{len(labels)} labels for {len(run_dirs)} run dirs")
    resolved = [resolve_run_dir(Path(p)) for p in run_dirs]
    runs = [read_run(p, labels[i] if labels else None) for i, p in enumerate(resolved)]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label}#{seen[run.label]}"
    return runs


def fmt(value: float | None) -> str:
    """A metric value for the tables."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"
