"""Run directories, config freezing, and the resume target of a run.

A run writes to a fresh ``run_dir`` (frozen config, metrics, tracker logs). Resumable state lives
in a checkpoint dir: with ``resuming.resume=true`` it is ``<outputs_dir>/checkpoints/<hash>``,
where ``<hash>`` is the hash of the resolved config minus ``resuming.ignore_keys``, so the same
command resumes and a changed command is refused with the differing keys listed.

The resume target is locked (:func:`lock_resume_target`, :mod:`post_training.utils.job_lock`)
before anything is read, cleaned or written there; a second launch of the same job exits at once.
The checkpoint resumed from is the newest one whose manifest verifies
(:func:`post_training.utils.checkpointing.resume_candidates`); damaged ones are moved aside.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig

from post_training.errors import ConfigError
from post_training.utils import job_lock, run_status
from post_training.utils.atomic import atomic_write_json, atomic_write_text
from post_training.utils.checkpointing import complete_checkpoints, resume_candidates
from post_training.utils.config import config_hash, diff_configs, to_container
from post_training.utils.progress import launch_rank

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunContext:
    """Where one run writes, and what it resumes from."""

    run_dir: Path
    checkpoint_dir: Path  # full checkpoints, inference checkpoints and the final model
    config: dict[str, Any]  # resolved, as frozen in run_dir/config.yaml
    config_hash: str
    resume_from: Path | None  # newest verified checkpoint, when resuming
    # verified checkpoints, newest first: resume_from, then the fallbacks if it fails to load
    resume_candidates: tuple[Path, ...] = ()


def dump_yaml(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def _check_no_drift(checkpoints_root: Path, this_hash: str, resolved: dict, ignore: list) -> None:
    """Refuse to start when the same job already holds checkpoints of a different config.

    Only hash dirs that hold a complete checkpoint count: a launch that stopped before its
    first checkpoint (a bad dataset row, say) holds nothing to protect. A hash dir with
    checkpoints but no ``config.yaml`` cannot be compared, so it is refused too."""
    for other in sorted(p for p in checkpoints_root.glob("*") if p.is_dir()):
        if other.name == this_hash or not complete_checkpoints(other):
            continue
        if not (other / CONFIG_FILE).exists():
            raise ConfigError(
                f"Refusing to resume: {other} holds checkpoints but no {CONFIG_FILE}, so its "
                "config cannot be compared with this one. Restore the file, use a new "
                "job_subdir, or set resuming.allow_config_change=true to start a separate run."
            )
        previous = yaml.safe_load((other / CONFIG_FILE).read_text())
        diffs = diff_configs(previous, resolved, ignore)
        if not diffs:
            continue
        lines = "\n".join(
            f"  {k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items())
        )
        raise ConfigError(
            f"Refusing to resume: job '{checkpoints_root.parent}' already holds checkpoints of a "
            f"different config in {other}.\nDiffering keys (previous -> now):\n{lines}\n"
            "Use a new job_subdir, add the keys to resuming.ignore_keys if they are safe to "
            "change, or set resuming.allow_config_change=true to start a separate run."
        )


def _hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def resume_target(resolved: dict[str, Any]) -> tuple[Path, str]:
    """The checkpoint dir of a resuming run and its config hash."""
    this_hash = config_hash(resolved, list(resolved["resuming"]["ignore_keys"]))
    explicit = resolved["resuming"]["dir"]
    default = Path(resolved["outputs_dir"]) / "checkpoints" / this_hash
    return (Path(explicit) if explicit else default), this_hash


def lock_settings(resuming: dict[str, Any]) -> job_lock.LockSettings:
    return job_lock.LockSettings(
        mode=resuming.get("lock", "flock"),
        heartbeat_s=float(resuming.get("lock_heartbeat_s", 30)),
        stale_after_s=float(resuming.get("lock_stale_after_s", 120)),
    )


def lock_resume_target(resolved: dict[str, Any], only_if_exists: bool = False) -> Path | None:
    """With ``resuming.resume``, the main process of the launch takes the job lock of the resume
    target (raises :class:`~post_training.utils.job_lock.JobLocked` when another launch holds
    it); the locked dir, or None. Cheap on purpose: ``frame.begin`` calls it before validation
    and before torch is imported, with ``only_if_exists`` (nothing is created before the config
    is valid: a job that never ran has no dir, and no running launch to collide with), so that a
    duplicate launch of a running job exits within a second or two; ``setup_run`` calls it again
    (idempotent), creating the dir."""
    resuming = resolved.get("resuming")
    if not isinstance(resuming, dict) or resuming.get("resume") is not True:
        return None
    if launch_rank() != 0:
        return None
    try:
        directory, _ = resume_target(resolved)
        settings = lock_settings(resuming)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # a malformed config: validation names the key; setup_run locks after it
    if only_if_exists and not directory.is_dir():
        return None
    job_lock.acquire(directory, settings)
    return directory


def _pick_resume(checkpoint_dir: Path, resuming: dict[str, Any]) -> list[Path]:
    """Verified checkpoints, newest first (damaged ones moved aside); raises when every
    checkpoint is damaged, unless ``resuming.fresh_start_if_damaged``."""
    good, damaged = resume_candidates(checkpoint_dir, resuming.get("verify", "sha256"))
    if damaged and not good:
        listed = "\n".join(f"  {line}" for line in damaged)
        if not resuming.get("fresh_start_if_damaged"):
            raise ConfigError(
                f"Refusing to resume: no checkpoint in {checkpoint_dir} verifies:\n{listed}\n"
                "Set resuming.fresh_start_if_damaged=true to train from scratch in this dir "
                "(the damaged checkpoints stay aside)."
            )
        log.warning("No checkpoint verifies; starting from scratch (fresh_start_if_damaged)")
    return good


def setup_run(cfg: DictConfig, accelerator: Accelerator | None = None) -> RunContext:
    """Resolve the config, create the run dir, freeze the config, and find the resume target.

    With several processes, every rank resolves its own timestamp; the main process's run dir
    is broadcast so that all ranks write (checkpoints, RNG states) to the same place, and the
    directory Hydra made for another rank moves into it as ``rank-<r>/`` (its log and .hydra).
    """
    resolved = to_container(cfg)
    is_main_process = accelerator is None or accelerator.is_main_process
    several = accelerator is not None and accelerator.num_processes > 1
    if several:
        from accelerate.utils import broadcast_object_list

        shared = [resolved["run_dir"]]
        broadcast_object_list(shared, from_process=0)
        own_dir = Path(resolved["run_dir"])
        resolved["run_dir"] = shared[0]
    ignore = list(resolved["resuming"]["ignore_keys"])
    checkpoint_dir, this_hash = resume_target(resolved)
    run_dir = Path(resolved["run_dir"])

    candidates: list[Path] = []
    if resolved["resuming"]["resume"]:
        if is_main_process:
            if not resolved["resuming"]["allow_config_change"]:  # refused: creates nothing
                _check_no_drift(checkpoint_dir.parent, checkpoint_dir.name, resolved, ignore)
            lock_resume_target(resolved)  # taken already by `frame.begin` if the dir existed
            candidates = _pick_resume(checkpoint_dir, resolved["resuming"])
        if several:
            shared = [[str(p) for p in candidates]]
            broadcast_object_list(shared, from_process=0)
            candidates = [Path(p) for p in shared[0]]
    else:
        checkpoint_dir = run_dir / "checkpoints"
    resume_from = candidates[0] if candidates else None

    if is_main_process:
        if (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"Run dir {run_dir} already holds a run; refusing to overwrite it.")
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(resolved, run_dir / CONFIG_FILE)
        if not (checkpoint_dir / CONFIG_FILE).exists():
            dump_yaml(resolved, checkpoint_dir / CONFIG_FILE)
        atomic_write_json(run_dir / "command.json", {"argv": sys.argv, "config_hash": this_hash})
        run_status.start(run_dir, resolved["entrypoint"], resume_from)
    if several:
        accelerator.wait_for_everyone()
        hydra_dir = _hydra_output_dir() or own_dir
        if not is_main_process and hydra_dir.exists() and hydra_dir != run_dir:
            os.replace(hydra_dir, run_dir / f"rank-{accelerator.process_index}")
    log.info("Run dir: %s", run_dir)
    log.info("Checkpoint dir: %s (config hash %s)", checkpoint_dir, this_hash)
    if resume_from is not None:
        log.info("Resuming from %s", resume_from)
    return RunContext(run_dir, checkpoint_dir, resolved, this_hash, resume_from, tuple(candidates))


TRACKER_ID_FILE = "tracker-run-id.txt"


def tracker_run_id(run: RunContext, job_subdir: str) -> str:
    """The tracker (wandb) run id of ``run``: a resumable job keeps one id across its launches
    (kept in its checkpoint dir, made by the first launch); any other run gets its own id
    (``<job>-<config hash>-<run dir name>``), so that two runs of one config never merge."""
    fresh = f"{job_subdir}-{run.config_hash}-{run.run_dir.name}"
    if not run.config["resuming"]["resume"]:
        return fresh
    path = run.checkpoint_dir / TRACKER_ID_FILE
    try:
        kept = path.read_text(encoding="utf-8").strip()
    except OSError:
        kept = ""
    if kept:
        return kept
    atomic_write_text(path, fresh + "\n")
    return fresh
