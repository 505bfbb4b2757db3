"""List the offline Weights & Biases runs under the artifacts directory and sync chosen ones.

    python -m post_training.launch.sync_wandb                 # numbered list, then a prompt
    python -m post_training.launch.sync_wandb --list          # list only
    python -m post_training.launch.sync_wandb 'sft-*' lr-0.001_run --dry-run
    python -m post_training.launch.sync_wandb --all           # every run not synced yet

Compute nodes usually log offline (``wandb.mode=auto`` without ``WANDB_API_KEY``): every run dir
then holds ``wandb/offline-run-<time>-<id>/``. This finds them, names each from its run dir's
frozen ``config.yaml`` (``wandb.run_name``, ``job_subdir``, ``wandb.project``), and runs
``wandb sync <dir>`` for the chosen ones (on a machine with network and a wandb login).
A run is synced when wandb left its ``*.wandb.synced`` marker; ``--all`` skips those unless
``--include-synced``. Patterns are shell-style (``*``, ``?``, ``[...]``) and match the run
name, the job, the run id or the path relative to the root.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from post_training.utils.config import default_artifacts_dir

OFFLINE_PREFIX = "offline-run-"


@dataclass(frozen=True)
class OfflineRun:
    path: Path  # .../wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>
    run_id: str
    started: str  # YYYY-MM-DD HH:MM:SS
    name: str  # wandb.run_name of the run dir's config, else the run id
    job: str  # job_subdir, or ""
    project: str  # wandb.project, or ""
    synced: bool

    def relative_to(self, root: Path) -> str:
        try:
            return str(self.path.relative_to(root))
        except ValueError:
            return str(self.path)


def _describe(path: Path) -> OfflineRun:
    stamp, _, run_id = path.name[len(OFFLINE_PREFIX) :].partition("-")
    started = stamp
    if len(stamp) == 15 and stamp[8] == "_":
        started = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}:{stamp[13:]}"
    name, job, project = run_id, "", ""
    config_file = path.parent.parent / "config.yaml"  # <run_dir>/wandb/offline-run-*
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            config = {}
        wandb_cfg = config.get("wandb") or {}
        name = str(wandb_cfg.get("run_name") or name)
        project = str(wandb_cfg.get("project") or "")
        job = str(config.get("job_subdir") or "")
    synced = any(path.glob("*.wandb.synced"))
    return OfflineRun(path, run_id, started, name, job, project, synced)


def find_offline_runs(root: Path) -> list[OfflineRun]:
    """Every ``wandb/offline-run-*`` directory under ``root``, oldest first."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if Path(dirpath).name == "wandb":
            found += [
                Path(dirpath) / d
                for d in dirnames
                if d.startswith(OFFLINE_PREFIX) and not (Path(dirpath) / d).is_symlink()
            ]
            dirnames.clear()  # nothing else to find inside a wandb dir
    runs = [_describe(p) for p in found]
    return sorted(runs, key=lambda r: (r.started, str(r.path)))


def select(runs: Sequence[OfflineRun], patterns: Sequence[str], root: Path) -> list[OfflineRun]:
    """Runs matched by any pattern; a pattern that matches nothing is an error."""
    chosen: list[OfflineRun] = []
    for pattern in patterns:
        matched = [
            run
            for run in runs
            if any(
                fnmatch.fnmatchcase(text, pattern)
                for text in (run.name, run.job, run.run_id, run.relative_to(root))
            )
        ]
        if not matched:
            raise SystemExit(f"error: no offline wandb run under {root} matches {pattern!r}")
        chosen += [run for run in matched if run not in chosen]
    return chosen


def parse_choice(answer: str, count: int) -> list[int]:
    """``"1 3-5, 7"`` or ``all`` -> 0-based indices; raises ValueError on anything else."""
    answer = answer.strip().lower()
    if answer in {"all", "a", "*"}:
        return list(range(count))
    indices: list[int] = []
    for token in answer.replace(",", " ").split():
        first, _, last = token.partition("-")
        lo, hi = int(first), int(last or first)
        if not 1 <= lo <= hi <= count:
            raise ValueError(f"{token!r} is not within 1-{count}")
        indices += [i - 1 for i in range(lo, hi + 1) if i - 1 not in indices]
    return indices


def print_table(runs: Sequence[OfflineRun], root: Path) -> None:
    if not runs:
        print(f"No offline wandb runs under {root}.")
        return
    print(f"Offline wandb runs under {root}:")
    width = max(len(r.name) for r in runs)
    for i, run in enumerate(runs, 1):
        status = "synced " if run.synced else "offline"
        project = f"[{run.project}] " if run.project else ""
        print(
            f"{i:>4}  {status}  {run.started:<19}  {run.name:<{width}}  {project}"
            f"{run.relative_to(root)}"
        )


def wandb_command() -> list[str]:
    """The ``wandb`` CLI of this environment (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / "wandb"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("wandb")
    return [found] if found else [sys.executable, "-m", "wandb"]


def sync(runs: Sequence[OfflineRun], dry_run: bool) -> int:
    """``wandb sync <dir>`` for each run; returns the number of failures."""
    failures = 0
    for run in runs:
        command = [*wandb_command(), "sync", str(run.path)]
        if dry_run:
            print("would run:", subprocess.list2cmdline(command))
            continue
        print(f"Syncing {run.name} ({run.path})", flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            failures += 1
            print(f"error: wandb sync failed for {run.path}", file=sys.stderr)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m post_training.launch.sync_wandb",
        description="List offline wandb runs under the artifacts directory and sync chosen ones.",
    )
    parser.add_argument("patterns", nargs="*", help="run names, jobs, run ids or paths (globs)")
    parser.add_argument("--root", type=Path, help="where to look (default: the artifacts dir)")
    parser.add_argument("--all", action="store_true", help="sync every run not synced yet")
    parser.add_argument("--include-synced", action="store_true", help="with --all: resync too")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what would be synced")
    args = parser.parse_args(argv)

    root = (args.root or Path(default_artifacts_dir())).resolve()
    if not root.is_dir():
        parser.error(f"{root} is not a directory")
    runs = find_offline_runs(root)
    if args.list:
        print_table(runs, root)
        return 0
    if args.patterns:
        chosen = select(runs, args.patterns, root)
    elif args.all:
        chosen = [r for r in runs if args.include_synced or not r.synced]
    else:
        print_table(runs, root)
        if not runs:
            return 0
        try:
            answer = input("Runs to sync (e.g. 1 3-5, 'all'; empty to quit): ")
        except EOFError:
            answer = ""
        if not answer.strip():
            return 0
        try:
            chosen = [runs[i] for i in parse_choice(answer, len(runs))]
        except ValueError as err:
            parser.error(f"invalid choice: {err}")
    if not chosen:
        print("Nothing to sync.")
        return 0
    return 1 if sync(chosen, args.dry_run) else 0


if __name__ == "__main__":
    sys.exit(main())
