"""Features that need whole parameters on every rank (``train_online``'s sampling, TR-DPO) are
refused under a launch that shards them (ZeRO-3, FSDP) from the launch's environment, in one
line, before anything but the failed launch's record is written (not at the trainer, after the
run's frozen config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from post_training.utils.launch_env import launch_sharding

from ..conftest import run_entrypoint
from ..test_config_errors import written_by_us

ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
FSDP = {"ACCELERATE_USE_FSDP": "true"}
CASES = {
    "train_online": ([], "train_online (each rank samples with the whole policy)"),
    "train_preference": (["trainer.sync_ref_model=true"], "trainer.sync_ref_model=true (TR-DPO)"),
}


@pytest.mark.parametrize("launch", [ZERO3, FSDP], ids=["zero3", "fsdp"])
@pytest.mark.parametrize("module", sorted(CASES))
def test_refused_before_the_run_dir(module: str, launch: dict, tmp_path: Path) -> None:
    overrides, feature = CASES[module]
    env = {**launch, "LOCAL_RANK": "0"}  # as accelerate launch sets them on a rank
    args = ["wandb.mode=disabled", "tensorboard=false", "job_subdir=refused", *overrides]
    proc = run_entrypoint(module, args, tmp_path, check=False, env=env)
    sharded = "zero3" if launch is ZERO3 else "fsdp"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {feature} needs whole parameters on every rank: not under {sharded} "
        "(use DDP, ZeRO-1 or ZeRO-2)"
    )
    assert "Traceback" not in proc.stderr
    assert written_by_us(tmp_path) == []  # no frozen config, no checkpoints/<hash>/


@pytest.mark.parametrize(
    "env,expected",
    [
        ({**ZERO3, "LOCAL_RANK": "1"}, "zero3"),
        ({**ZERO3, "LOCAL_RANK": "0", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
        ({**FSDP, "LOCAL_RANK": "0"}, "fsdp"),
        (ZERO3, None),  # not a launched rank: accelerate does not shard a plain process
        ({}, None),
    ],
)
def test_launch_sharding_reads_the_launch(
    env: dict, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("LOCAL_RANK", *ZERO3, *FSDP):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_sharding() == expected
