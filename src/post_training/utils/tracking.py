"""Metrics sinks: ``metrics.jsonl`` (always), TensorBoard and Weights & Biases (configurable).

Only the main process writes. Every event is one JSON object per line with its ``step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_mode(requested: str) -> str:
    """``auto`` is online when an API key is configured, else offline (never prompts)."""
    if requested != "auto":
        if requested not in {"online", "offline", "disabled"}:
            raise ValueError(f"wandb.mode must be auto|online|offline|disabled, got {requested!r}")
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Fans metrics out to metrics.jsonl, TensorBoard and wandb."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        run_id: str,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_cfg: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        wandb_cfg = wandb_cfg or {"mode": "disabled"}
        mode = wandb_mode(wandb_cfg["mode"])
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg["project"],
                entity=wandb_cfg.get("entity"),
                name=wandb_cfg.get("run_name"),
                tags=list(wandb_cfg.get("tags") or []),
                id=re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:128],
                resume="allow",
                mode=mode,
                dir=str(run_dir),
                config=config,
            )
            log.info("wandb: %s mode, run id %s", mode, self._wandb.id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                if key != "time":
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in numeric.items() if k != "time"}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
