"""What an ``accelerate launch`` asked for, read from its environment variables without importing
torch or accelerate: entrypoints refuse a launch a feature cannot run under before the run
directory is written (:func:`refuse_sharded`); :mod:`post_training.utils.distributed` builds the
accelerator from the same variables."""

from __future__ import annotations

import os

from post_training.errors import ConfigError

ONLINE_SAMPLING = "train_online (each rank samples with the whole policy)"
TR_DPO = "trainer.sync_ref_model=true (TR-DPO)"
"""Features that need whole parameters on every rank, as :func:`refuse_sharded` names them."""


def flag(name: str) -> bool:
    """An environment variable read as a boolean (``1`` / ``true`` / ``yes``)."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_with(kind: str) -> bool:
    """Whether ``accelerate launch`` asked for ``kind`` (``deepspeed`` or ``fsdp``) on a
    launched rank (``LOCAL_RANK`` set)."""
    variable = {"deepspeed": "ACCELERATE_USE_DEEPSPEED", "fsdp": "ACCELERATE_USE_FSDP"}[kind]
    return flag(variable) and int(os.environ.get("LOCAL_RANK", -1)) != -1


def launch_sharding() -> str | None:
    """``"zero3"`` or ``"fsdp"`` when the launch shards the parameters, else None (as
    :func:`post_training.utils.distributed.sharding` says once the accelerator exists)."""
    if launched_with("deepspeed") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "zero3"
    return "fsdp" if launched_with("fsdp") else None


def refuse_sharded(feature: str, sharded: str | None) -> None:
    """A ConfigError when ``feature`` (which needs whole parameters on every rank) meets a
    sharded launch (``sharded``: ``zero3`` / ``fsdp`` / None)."""
    if sharded:
        raise ConfigError(
            f"{feature} needs whole parameters on every rank: not under {sharded} "
            "(use DDP, ZeRO-1 or ZeRO-2)"
        )
