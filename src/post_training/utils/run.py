"""Run directories, config freezing, and the resume target of a run.

A run writes to a fresh ``run_dir`` (frozen config, metrics, tracker logs). Resumable state lives
in a checkpoint dir: with ``resuming.resume=true`` it is ``<outputs_dir>/checkpoints/<hash>``,
where ``<hash>`` is the hash of the resolved config minus ``resuming.ignore_keys``, so the same
command resumes and a changed command is refused with the differing keys listed.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig

from post_training.errors import ConfigError
from post_training.utils.atomic import atomic_write_json, atomic_write_text
from post_training.utils.checkpointing import complete_checkpoints, latest_checkpoint
from post_training.utils.config import config_hash, diff_configs, to_container

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunContext:
    """Where one run writes, and what it resumes from."""

    run_dir: Path
    checkpoint_dir: Path  # full checkpoints, inference checkpoints and the final model
    config: dict[str, Any]  # resolved, as frozen in run_dir/config.yaml
    config_hash: str
    resume_from: Path | None  # last complete checkpoint, when resuming


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


def setup_run(cfg: DictConfig, accelerator: Accelerator | None = None) -> RunContext:
    """Resolve the config, create the run dir, freeze the config, and find the resume target.

    With several processes, every rank resolves its own timestamp; the main process's run dir
    is broadcast so that all ranks write (checkpoints, RNG states) to the same place, and the
    directory Hydra made for another rank moves into it as ``rank-<r>/`` (its log and .hydra).
    """
    resolved = to_container(cfg)
    is_main_process = accelerator is None or accelerator.is_main_process
    if accelerator is not None and accelerator.num_processes > 1:
        shared = [resolved["run_dir"]]
        broadcast_object_list(shared, from_process=0)
        own_dir = Path(resolved["run_dir"])
        resolved["run_dir"] = shared[0]
    ignore = list(resolved["resuming"]["ignore_keys"])
    this_hash = config_hash(resolved, ignore)
    run_dir = Path(resolved["run_dir"])
    outputs_dir = Path(resolved["outputs_dir"])

    resume_from = None
    if resolved["resuming"]["resume"]:
        explicit = resolved["resuming"]["dir"]
        checkpoint_dir = Path(explicit) if explicit else outputs_dir / "checkpoints" / this_hash
        if not resolved["resuming"]["allow_config_change"]:
            _check_no_drift(checkpoint_dir.parent, checkpoint_dir.name, resolved, ignore)
        resume_from = latest_checkpoint(checkpoint_dir)
    else:
        checkpoint_dir = run_dir / "checkpoints"

    if is_main_process:
        if (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"Run dir {run_dir} already holds a run; refusing to overwrite it.")
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(resolved, run_dir / CONFIG_FILE)
        if not (checkpoint_dir / CONFIG_FILE).exists():
            dump_yaml(resolved, checkpoint_dir / CONFIG_FILE)
        atomic_write_json(run_dir / "command.json", {"argv": sys.argv, "config_hash": this_hash})
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        hydra_dir = _hydra_output_dir() or own_dir
        if not is_main_process and hydra_dir.exists() and hydra_dir != run_dir:
            os.replace(hydra_dir, run_dir / f"rank-{accelerator.process_index}")
    log.info("Run dir: %s", run_dir)
    log.info("Checkpoint dir: %s (config hash %s)", checkpoint_dir, this_hash)
    if resume_from is not None:
        log.info("Resuming from %s", resume_from)
    return RunContext(run_dir, checkpoint_dir, resolved, this_hash, resume_from)
