"""Scale-out on CPU ranks: DeepSpeed ZeRO-1/2/3 and FSDP2 launched as users launch them.

``accelerate launch --config_file src/post_training/configs/accelerate/<ds-zero{1,2,3}|fsdp>.yaml
--num_processes 2`` runs two gloo ranks on this machine (DeepSpeed's CPU accelerator; accelerate's
FSDP2 on CPU tensors, see :mod:`post_training.utils.distributed`). Each run must equal one process
with the same global batch (16 = 2 ranks × 4 per device × 2 accumulated): the logged loss and
gradient norm of every step, and the final weights (a plain HF checkpoint gathered from the
shards) within fp32 tolerance. A run killed at a checkpoint and resumed under the same stage ends
bit-identical to an uninterrupted one.

Preference training covers the three reference modes: a live frozen reference model (sharded
like the policy under ZeRO-3 and FSDP2: half of its parameters per rank, from the log), the
reference log-probs precomputed (scored in shares by both ranks), and the PEFT policy without
its adapters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import QUICK, REPO, final_weights, job_dir, save_initial_model

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="needs deepspeed (pip install -e '.[dev]' installs it)",
    ),
]

CONFIGS = REPO / "src" / "post_training" / "configs" / "accelerate"
STEPS = ("training_args.max_steps=4", "training_args.save_steps=2", "resuming.resume=true")
ONE = (
    "training_args.per_device_train_batch_size=16",
    "training_args.gradient_accumulation_steps=1",
)
TWO = ("training_args.per_device_train_batch_size=4", "training_args.gradient_accumulation_steps=2")

SFT = {
    "sft": (),  # chunked LM head with the gradient hint (a loss linear in the log-probs)
    "plw-packed": ("trainer=plw", "training_args.packing=true", "model.max_seq_length=128"),
    "irl": ("trainer=irl",),  # chunked head without the hint (the loss is not linear)
}
PREFERENCE = {
    "live": ("trainer=dpo",),
    "precomputed": ("trainer=dpo", "reference.precompute=true"),
    # lora_dropout=0: dropout masks come from each rank's RNG, never equal to one process's.
    "peft": ("trainer=dpo", "model_args.use_peft=true", "model_args.lora_r=4",
             "model_args.lora_dropout=0.0", "training_args.learning_rate=0.002"),
}  # fmt: skip
# From a saved checkpoint (a user's SFT model): ZeRO-3 loads policy and reference partitioned
# (zero.Init), FSDP2 loads them on rank 0 and broadcasts (cpu_ram_efficient_loading).
PREFERENCE["pretrained"] = ("trainer=dpo", "model.init_from_config=false")
PREFERENCE["kto"] = ("trainer=kto", "dataset.unpair=true")  # z0 over the window and both ranks
REWARD = {"reward": ()}  # train_reward: the score head's output read through a forward hook
ENTRYPOINT = {
    **dict.fromkeys(SFT, "train_sft"),
    **dict.fromkeys(PREFERENCE, "train_preference"),
    **dict.fromkeys(REWARD, "train_reward"),
}
OVERRIDES = {**SFT, **PREFERENCE, **REWARD}


def _env(artifacts: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "POST_TRAINING_ARTIFACTS_DIR": str(artifacts),
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


def _common(case: str, job: str, artifacts: Path) -> list[str]:
    quick = [a for a in QUICK if ENTRYPOINT[case] != "train_reward" or "evaluation" not in a]
    start = []
    if case == "pretrained":
        start = [f"model.model_name_or_path={artifacts / 'start'}"]
        if not (artifacts / "start").is_dir():
            save_initial_model(artifacts / "start")
    return [*quick, *STEPS, *start, "training_args.max_grad_norm=1.0",
            "dataset.max_train_examples=96", *OVERRIDES[case], f"job_subdir={job}"]  # fmt: skip


def run_one(artifacts: Path, case: str) -> str:
    """One process, global batch 16; the job's name."""
    job = f"{case}-one"
    if not job_dir(artifacts, job, ENTRYPOINT[case]).is_dir():
        proc = subprocess.run(
            [sys.executable, "-m", f"post_training.{ENTRYPOINT[case]}",
             *_common(case, job, artifacts), *ONE],
            cwd=REPO, env=_env(artifacts), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    return job


_PORT = iter(range(29620, 29700))


def launch(
    artifacts: Path,
    config: str,
    case: str,
    job: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --config_file <config>.yaml --num_processes 2`` of the case's
    entrypoint, 2 ranks × 4 per device × 2 accumulated."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / f"{config}.yaml"), "--num_processes", "2", "--main_process_port",
        str(next(_PORT)), "-m", f"post_training.{ENTRYPOINT[case]}", *_common(case, job, artifacts),
        *TWO,
        f"data.cache_dir={artifacts / ('cache-' + job)}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=REPO, env=_env(artifacts, env), capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def step_metrics(artifacts: Path, job: str, entrypoint: str) -> list[dict[str, float]]:
    (metrics,) = job_dir(artifacts, job, entrypoint).rglob("metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if "grad_norm" in r]


def assert_equal_runs(artifacts: Path, case: str, one: str, two: str, atol: float) -> float:
    """Same per-step loss and gradient norm, same final weights (the largest deviation)."""
    entry = ENTRYPOINT[case]
    a, b = step_metrics(artifacts, one, entry), step_metrics(artifacts, two, entry)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (case, x["step"], key)
    ref, got = final_weights(artifacts, one, entry), final_weights(artifacts, two, entry)
    assert ref.keys() == got.keys(), sorted(set(ref) ^ set(got))
    worst = 0.0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=atol, msg=name)
        worst = max(worst, (got[name] - ref[name]).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifacts dir for the module: the one-process runs are trained once."""
    return tmp_path_factory.mktemp("scale-out")


MATRIX = [
    ("ds-zero1", "sft"), ("ds-zero2", "sft"), ("ds-zero3", "sft"), ("fsdp", "sft"),
    ("ds-zero2", "plw-packed"), ("ds-zero3", "plw-packed"), ("fsdp", "plw-packed"),
    ("ds-zero3", "irl"),
    ("ds-zero1", "live"), ("ds-zero2", "live"), ("ds-zero3", "live"), ("fsdp", "live"),
    ("ds-zero3", "precomputed"), ("fsdp", "precomputed"),
    ("ds-zero3", "peft"), ("fsdp", "peft"),
    ("ds-zero3", "pretrained"), ("fsdp", "pretrained"),
    ("ds-zero3", "kto"), ("ds-zero3", "reward"), ("fsdp", "reward"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "case"), MATRIX)
def test_two_ranks_equal_one_process(shared: Path, config: str, case: str) -> None:
    one = run_one(shared, case)
    two = f"{case}-{config}"
    # SFT: the end-of-run exact match too (the main process alone loads final-model/ and
    # generates, inside a launch whose other rank waits).
    at_end = ("evaluation.at_end=true",) if case == "sft" else ()
    proc = launch(shared, config, case, two, extra=at_end)
    worst = assert_equal_runs(shared, case, one, two, atol=1e-5)
    print(f"{config} {case}: largest weight deviation from one process {worst:.2e}")
    logs = proc.stdout + proc.stderr
    sharded = config in ("ds-zero3", "fsdp")
    if ENTRYPOINT[case] == "train_preference" and case != "peft":
        lines = re.findall(r"Reference model: ([^,]+), ([\d.]+)M of its ([\d.]+)M", logs)
        if case == "precomputed":  # the model was freed after the shared pass
            assert "Reference log-probs of" in logs
        assert len(lines) == 2, logs[-3000:]  # one per rank
        for placement, local, whole in lines:
            assert placement.startswith("sharded") == sharded, placement
            assert float(local) == pytest.approx(float(whole) / (2 if sharded else 1), abs=0.02), (
                "a sharded reference holds half of its parameters per rank"
            )
    if at_end:
        assert "Exact-match accuracy" in logs, logs[-3000:]
    (final,) = job_dir(shared, two, ENTRYPOINT[case]).rglob("final-model")
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert not list(final.glob("*.pt")), "a plain HF checkpoint, not DeepSpeed shards"


@pytest.mark.parametrize("config", ["ds-zero3", "fsdp"])
def test_killed_and_resumed_equals_uninterrupted(shared: Path, config: str) -> None:
    """Killed (SIGKILL) while saving the step-4 checkpoint, resumed from step 2 under the same
    stage: bit-identical final weights to the uninterrupted two-rank run."""
    straight = f"sft-{config}"
    if not job_dir(shared, straight).is_dir():
        launch(shared, config, "sft", straight)
    killed = f"sft-{config}-killed"
    first = launch(
        shared,
        config,
        "sft",
        killed,
        env={"POST_TRAINING_FAILPOINT": "checkpoint-saved-state@4"},
        check=False,
    )
    assert first.returncode != 0
    ckpts = job_dir(shared, killed) / "checkpoints"
    assert list(ckpts.glob("*/checkpoint-2")) and not list(ckpts.glob("*/final-model"))
    second = launch(shared, config, "sft", killed)
    assert "Resumed at step 2" in second.stdout + second.stderr
    a, b = final_weights(shared, straight), final_weights(shared, killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_tr_dpo_is_refused_under_sharding(shared: Path) -> None:
    """TR-DPO mixes the policy into the reference parameter by parameter: refused in one line
    under ZeRO-3 (sharded parameters), before any step."""
    job = "trdpo-refused"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / "ds-zero3.yaml"), "--num_processes", "2", "--main_process_port",
        str(next(_PORT)), "-m", "post_training.train_preference",
        *_common("live", job, shared), *TWO, "trainer.sync_ref_model=true",
    ]  # fmt: skip
    refused = subprocess.run(
        command, cwd=REPO, env=_env(shared), capture_output=True, text=True, timeout=600
    )
    assert refused.returncode != 0
    assert "trainer.sync_ref_model=true (TR-DPO) needs whole parameters" in refused.stderr
    # No traceback of ours (the launcher prints its own for any failed rank).
    assert "post_training/trainers" not in refused.stderr
    for metrics in job_dir(shared, job, "train_preference").rglob("metrics.jsonl"):
        assert not metrics.read_text().strip(), "refused before the first step"
