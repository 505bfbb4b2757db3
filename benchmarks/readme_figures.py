"""The figures the README quotes, measured and written back into it, so that they stay true.

    python -m benchmarks.readme_figures main-job      # runs the README's main job (~9 min)
    python -m benchmarks.readme_figures tests          # counts the collected tests (~30 s)
    python -m benchmarks.readme_figures ci LOG         # reads a `.ci/run` log: times, outcome
    python -m benchmarks.readme_figures preference     # SFT start, then KTO and DPO (~15 min)
    python -m benchmarks.readme_figures write          # rewrites the README from the record
    python -m benchmarks.readme_figures check          # exit 1 when README and record differ

Each measurement updates ``benchmarks/readme_figures.json`` (value, date, what measured it) and
rewrites the README's marked figures: ``<!-- fig:KEY -->VALUE<!-- /fig -->`` (the markers do
not render). ``tests/test_readme.py`` checks that every marked figure equals the record and
that the record is not stale (the test count within tolerance of what is collected now; the
main job's e2e test compares its own accuracy, time and memory with the record).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RECORD = REPO / "benchmarks" / "readme_figures.json"
FIGURE = re.compile(r"<!-- fig:(?P<key>[a-z0-9_]+) -->(?P<value>.*?)<!-- /fig -->")


# ------------------------------------------------------------------------------ formatting
def duration(seconds: float) -> str:
    """``9 min 17 s``, ``35 min``, ``42 s``."""
    minutes, secs = divmod(round(seconds), 60)
    if not minutes:
        return f"{secs} s"
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"


FORMATS: dict[str, Callable[[Any], str]] = {
    "main_job_accuracy": lambda v: f"{v:.3f}",
    "main_job_per_task": lambda v: ", ".join(f"{k} {x:.3f}" for k, x in sorted(v.items())),
    "main_job_time": duration,
    "main_job_peak_gb": lambda v: f"{v:.2f} GB",
    "main_job_steps": lambda v: f"{v:,}",
    "main_job_step_s": lambda v: f"{v:.2f} s",
    "main_job_date": str,
    "tests_collected": lambda v: f"{v:,}",
    "ci_time": duration,
    "ci_pytest_time": duration,
    "ci_outcome": str,
    "ci_date": str,
    "pref_start": lambda v: f"{v:.3f}",
    "pref_kto_tiny_pairs": lambda v: f"{v:.3f}",
    "pref_dpo_tiny_pairs": lambda v: f"{v:.3f}",
}


def formatted(record: Mapping[str, Any]) -> dict[str, str]:
    """The README text of every recorded figure."""
    return {k: FORMATS[k](v["value"]) for k, v in record.items() if k in FORMATS}


# ------------------------------------------------------------------------------ record, README
def read_record() -> dict[str, Any]:
    return json.loads(RECORD.read_text(encoding="utf-8")) if RECORD.exists() else {}


def update_record(values: Mapping[str, Any], how: str) -> dict[str, Any]:
    record = read_record()
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for key, value in values.items():
        record[key] = {"value": value, "measured": today, "how": how}
    RECORD.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def readme_figures(text: str) -> dict[str, str]:
    """The marked figures of the README text: key -> value as written."""
    return {m["key"]: m["value"] for m in FIGURE.finditer(text)}


def rewrite_readme(record: Mapping[str, Any]) -> list[str]:
    """Write the recorded figures into the README's markers; the keys changed."""
    text = README.read_text(encoding="utf-8")
    values = formatted(record)
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in values:
            return match[0]
        if values[key] != match["value"]:
            changed.append(key)
        return f"<!-- fig:{key} -->{values[key]}<!-- /fig -->"

    README.write_text(FIGURE.sub(replace, text), encoding="utf-8")
    return changed


def mismatches(text: str, record: Mapping[str, Any]) -> list[str]:
    """``key: README says X, record says Y`` for each marked figure that differs or that the
    record lacks."""
    values = formatted(record)
    problems = []
    for key, written in readme_figures(text).items():
        if key not in values:
            problems.append(f"{key}: in the README, not in {RECORD.name}")
        elif values[key] != written:
            problems.append(f"{key}: README says {written!r}, {RECORD.name} says {values[key]!r}")
    return problems


# ------------------------------------------------------------------------------ measurements
def main_job_command() -> str:
    """The main job of the README's command 1: its last ``&&`` part (the set-up before it is
    the same as command 2's, which `.ci/run` runs verbatim)."""
    for line in README.read_text(encoding="utf-8").splitlines():
        if "post_training.train_sft" in line and line.startswith("python3 -m venv"):
            return line.split("&&")[-1].strip()
    raise SystemExit("README: command 1 (set up && main job) not found")


def run_main_job(artifacts: Path) -> dict[str, Any]:
    """Run the README's main job as written, in ``artifacts``; its figures."""
    command = main_job_command()
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts)}
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"main job exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return main_job_figures(artifacts, wall)


def main_job_figures(artifacts: Path, wall_s: float) -> dict[str, Any]:
    """The figures of a finished main job under ``artifacts``."""
    (final,) = artifacts.rglob("final-model")
    result = json.loads((final / "eval-tiny-tasks.json").read_text(encoding="utf-8"))
    (metrics_file,) = artifacts.rglob("metrics.jsonl")
    lines = [json.loads(x) for x in metrics_file.read_text(encoding="utf-8").splitlines() if x]
    peaks = [m["peak_memory_gb"] for m in lines if isinstance(m.get("peak_memory_gb"), float)]
    steps = max(m["step"] for m in lines)
    return {
        "main_job_accuracy": result["accuracy"],
        "main_job_per_task": result["per_task"],
        "main_job_time": round(wall_s, 1),
        "main_job_peak_gb": round(max(peaks), 3),
        "main_job_steps": steps,
        "main_job_step_s": round(wall_s / steps, 3),
        "main_job_date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def count_tests() -> int:
    """Tests collected by the README's test command (``pytest --collect-only``)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"(\d+) tests? collected", proc.stdout) or re.search(
        r"^(\d+) tests?", proc.stdout.splitlines()[-1] if proc.stdout else "", re.M
    )
    if not found:
        raise SystemExit(f"pytest --collect-only printed no count:\n{proc.stdout[-2000:]}")
    return int(found[1])


CI_SUMMARY = re.compile(r"=+ (?P<outcome>.*?) in (?P<seconds>[\d.]+)s")


def ci_figures(log: str) -> dict[str, Any]:
    """Figures of a ``.ci/run`` log: its total and pytest times and the outcome line."""
    total = re.search(r"CI finished in (\d+)s", log)
    summary = None
    for match in CI_SUMMARY.finditer(log):
        summary = match
    if not total or not summary:
        raise SystemExit("the log has no `CI finished in` line or no pytest summary")
    return {
        "ci_time": int(total[1]),
        "ci_pytest_time": float(summary["seconds"]),
        "ci_outcome": summary["outcome"].strip(),
        "ci_date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


PREFERENCE_START = ("training_args.num_train_epochs=null", "training_args.max_steps=300")
"""The SFT start of the preference figures: the preference e2e tests' start (300 steps)."""
PREFERENCE_RUN = ("dataset.max_train_examples=1000", "training_args.learning_rate=5e-5")
"""Each preference run: 1,000 pairs of ``tiny-pairs``, one epoch, lr 5e-5."""


def _accuracy(artifacts: Path, entrypoint: str, args: list[str]) -> tuple[float, Path]:
    """Run ``post_training.<entrypoint>`` in ``artifacts``; its held-out exact match and model."""
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts)}
    command = [sys.executable, "-m", f"post_training.{entrypoint}", "wandb.mode=disabled",
               "tensorboard=false", *args]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    (final,) = (artifacts / "private").rglob("final-model")
    result = json.loads((final / "eval-tiny-tasks.json").read_text(encoding="utf-8"))
    return float(result["accuracy"]), final


def preference_figures(root: Path) -> dict[str, Any]:
    """The README's "what to expect" figures: a 300-step SFT start, then KTO and DPO on
    ``tiny-pairs`` (off-policy pairs: the task's answer vs a random wrong one) from it."""
    start, model = _accuracy(root / "sft", "train_sft", list(PREFERENCE_START))
    origin = [f"model.model_name_or_path={model}", "model.init_from_config=false"]
    figures: dict[str, Any] = {"pref_start": start}
    for key, trainer in (("pref_kto_tiny_pairs", ["trainer=kto", "dataset.unpair=true"]),
                         ("pref_dpo_tiny_pairs", ["trainer=dpo"])):  # fmt: skip
        figures[key], _ = _accuracy(root / key, "train_preference",
                                    [*origin, *trainer, *PREFERENCE_RUN])  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("main-job", help="run the README's main job and record its figures")
    sub.add_parser("tests", help="record the number of collected tests")
    ci = sub.add_parser("ci", help="record the times and outcome of a .ci/run log")
    ci.add_argument("log", type=Path)
    sub.add_parser("preference", help="record KTO and DPO from an SFT start (~15 min)")
    sub.add_parser("write", help="write the record into the README")
    sub.add_parser("check", help="exit 1 when the README and the record differ")
    args = parser.parse_args(argv)

    if args.what == "check":
        problems = mismatches(README.read_text(encoding="utf-8"), read_record())
        print("\n".join(problems) or "README figures match the record")
        return 1 if problems else 0
    if args.what == "main-job":
        with tempfile.TemporaryDirectory(prefix="readme-main-job-") as tmp:
            values = run_main_job(Path(tmp))
        record = update_record(values, "python -m benchmarks.readme_figures main-job")
    elif args.what == "preference":
        with tempfile.TemporaryDirectory(prefix="readme-preference-") as tmp:
            values = preference_figures(Path(tmp))
        record = update_record(values, "python -m benchmarks.readme_figures preference")
    elif args.what == "tests":
        record = update_record({"tests_collected": count_tests()}, "pytest --collect-only")
    elif args.what == "ci":
        values = ci_figures(args.log.read_text(encoding="utf-8", errors="replace"))
        record = update_record(values, f"python -m benchmarks.readme_figures ci {args.log.name}")
    else:
        record = read_record()
    changed = rewrite_readme(record)
    print(f"README: {len(changed)} figures changed ({', '.join(changed) or 'none'})")
    for key, value in formatted(record).items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
