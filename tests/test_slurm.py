"""Real SLURM: a generated submit.sh whose jobs checkpoint before their wall time and requeue.

A single-node cluster (tests/slurm_cluster.py) runs the SFT template's generate_submit.py
output for the tiny model: each attempt gets 2 minutes of wall time and SLURM's USR1 30-60 s
after it starts (``--signal=B:USR1@60``; SLURM checks time limits every 30 s and may signal up to
30 s early); the batch shell forwards it, the trainer checkpoints and exits 75, and the
pre-submitted ``afternotok`` successor resumes. ``max_steps`` is set from the measured speed so
that one attempt cannot finish the run (at least one interruption); two or three do. The
uninterrupted reference run trains meanwhile, directly through the entrypoint. A job that always
fails runs alongside and must stop after MAX_RETRIES.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from post_training.launch.submit import ACCELERATE_CONFIGS_DIR, SUBMIT_SCRIPTS_DIR, Model

from .conftest import QUICK, REPO, read_metrics
from .slurm_cluster import SlurmCluster, slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

# Values that must reach the run verbatim through Python -> shell -> sbatch -> bash -> srun ->
# accelerate -> Hydra -> OmegaConf: the submit folder (sbatch --output paths) and
# artifacts_subdir (the run's output path) hold spaces, quotes, $ and ;.
WEIRD_DIR = "exp 'one' \"two\" $HOME; x"
WEIRD_SUBDIR = "sub dir 'q' \"dq\" $USER;$(id) `x`"
WEIRD_PROJECT = "p ${oc.env:HOME} \\${x} a\\b c\\ 'it''s' \"q\" $HOME; rm -rf x, [1] {a: b} = %j"
PREFIX = "slurm-test"
RUN_NAME = "tiny_tiny-tasks_trainer-sft"
FAIL_NAME = "always-fails"
FAIL_RETRIES = 2
SECONDS_PER_ATTEMPT_MAX = 60  # the signal comes at most this long after an attempt starts


def job_env(artifacts: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "POST_TRAINING_ARTIFACTS_DIR": str(artifacts),
        "OMP_NUM_THREADS": "1",  # same arithmetic in the SLURM jobs and the reference run
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DEVICES_PER_NODE": "1",
        "RUNTIME": "venv",
        "STOP_RESEND_SECONDS": "5",
        **extra,
    }
    env.pop("SUBMIT_SCRIPTS_DIR", None)
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["VENV_DIR"] = sys.prefix  # the venv running the tests
    return env


def train(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "post_training.train_sft", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-5000:]
    return output


def steps_per_second(artifacts: Path) -> float:
    """Training speed of the tiny model with the test's settings, from a short run's metrics."""
    env = job_env(artifacts)
    finish(train([*QUICK, "training_args.max_steps=120", "job_subdir=calibrate"], env), 300)
    (metrics,) = (artifacts / "private/outputs/train_sft/calibrate/runs").glob("*/metrics.jsonl")
    events = {m["step"]: m["time"] for m in read_metrics(metrics.parent) if "loss" in m}
    return 100 / (events[120] - events[20])


def load_template(path: Path):
    spec = importlib.util.spec_from_file_location("generate_submit_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Submitted:
    cluster: SlurmCluster
    artifacts: Path
    submit_dir: Path
    max_steps: int
    reference: subprocess.Popen[str]
    fail_out: Path
    started: float


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def submitted(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    """Generate and submit the SFT chain and the always-failing chain; start the reference."""
    tmp = tmp_path_factory.mktemp("slurm")
    artifacts = tmp / "artifacts"
    started = time.monotonic()
    speed = steps_per_second(artifacts)
    # An attempt trains for less than SECONDS_PER_ATTEMPT_MAX (its start-up included), so two
    # minutes of training at the measured speed need a second attempt even when the chain runs
    # up to twice as fast as the calibration did (a calibration under a load that ends before
    # the chain runs: seen once, the chain then finished in one attempt), and rarely a fourth.
    max_steps = max(300, int(2 * speed * SECONDS_PER_ATTEMPT_MAX))
    print(f"tiny model: {speed:.1f} steps/s; max_steps={max_steps}")

    # The user's workflow: copy the template folder, edit its sweep, run it.
    template = tmp / WEIRD_DIR / "1-slurm-test"
    shutil.copytree(REPO / "reproducibility-scripts/sft/0-template", template)
    generator = load_template(template / "generate_submit.py")
    generator.PREFIX = PREFIX
    generator.TIME = "00:02:00"
    generator.ARTIFACTS_SUBDIR = WEIRD_SUBDIR
    generator.GLOBAL_BATCH_SIZE = 8
    generator.MODELS = [Model("tiny", nodes=1, per_device_batch_size=8, accelerate="cpu")]
    generator.DATASETS = ["tiny-tasks"]
    generator.HYPERPARAMETERS = {"trainer": ["sft"]}
    generator.OVERRIDES = {
        **{
            # QUICK as Python values; the batch sizes come from MODELS and GLOBAL_BATCH_SIZE.
            k: yaml.safe_load(v)
            for k, v in (item.split("=", 1) for item in QUICK)
            if "batch_size" not in k and "accumulation" not in k
        },
        "training_args.max_steps": max_steps,
        "wandb.project": WEIRD_PROJECT,
    }
    generator.ENV = {"MAX_RETRIES": "8"}
    submit = generator.main([])
    assert re.fullmatch(rf"{PREFIX}-\d{{4}}-\d\d-\d\d-\d\d-\d\d", submit.parent.name)

    env = job_env(artifacts, SLURM_CONF=str(slurm.conf), SBATCH_SIGNAL="B:USR1@60")
    proc = subprocess.run(["bash", str(submit)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.count("Submitted batch job") == 1, proc.stdout

    # A chain whose command always fails: MAX_RETRIES successors, then it stops.
    fail_dir = tmp / "fail"
    fail_dir.mkdir()
    (fail_dir / "fail.py").write_text("import sys\nprint('failing on purpose')\nsys.exit(3)\n")
    fail_out = fail_dir / f"{FAIL_NAME}.out"
    subprocess.run(
        ["sbatch", f"--job-name={FAIL_NAME}", "--nodes=1", "--time=00:02:00",
         f"--output={fail_out}", f"--error={fail_dir / FAIL_NAME}.err",
         str(SUBMIT_SCRIPTS_DIR / "recursive-unattended-accelerate.sh"),
         "--config_file", str(ACCELERATE_CONFIGS_DIR / "cpu.yaml"), str(fail_dir / "fail.py")],
        env={**env, "MAX_RETRIES": str(FAIL_RETRIES)}, check=True, capture_output=True,
    )  # fmt: skip

    # The uninterrupted reference: the same config straight through the entrypoint.
    reference = train(
        [
            *QUICK,
            f"training_args.max_steps={max_steps}",
            "model=tiny",
            "dataset=tiny-tasks",
            "trainer=sft",
            "training_args.gradient_accumulation_steps=1",
            "job_subdir=reference",
        ],
        job_env(artifacts),
    )
    yield Submitted(slurm, artifacts, submit.parent, max_steps, reference, fail_out, started)
    if reference.poll() is None:
        reference.kill()


def chain(out_dir: Path, name: str) -> list[dict]:
    """The attempts of a chain from its logs: job id, successor, log text, in order."""
    attempts = []
    for path in [out_dir / f"{name}.out", *sorted(out_dir.glob(f"{name}-retry*.out"))]:
        text = path.read_text() + path.with_suffix(".err").read_text()
        match = re.search(r"attempt (\d+) of job (\d+)", text)
        assert match, text[-3000:]
        successor = re.search(r"submitted successor (\d+)", text)
        attempts.append(
            {
                "attempt": int(match.group(1)),
                "job": match.group(2),
                "successor": successor.group(1) if successor else None,
                "log": text,
                "path": path,
            }
        )
    attempts.sort(key=lambda a: a["attempt"])
    assert [a["attempt"] for a in attempts] == list(range(len(attempts)))
    return attempts


def test_generated_chain_checkpoints_requeues_and_resumes_to_identical_weights(
    submitted: Submitted,
) -> None:
    cluster = submitted.cluster
    cluster.wait_until_idle({RUN_NAME}, timeout=900)
    elapsed = time.monotonic() - submitted.started
    attempts = chain(submitted.submit_dir / "out", RUN_NAME)
    interruptions = len(attempts) - 1
    print(f"{len(attempts)} attempts ({interruptions} interruptions), {elapsed:.0f}s in all")
    assert interruptions >= 1

    # Every attempt but the last was stopped by SLURM's USR1 and checkpointed (exit 75).
    for attempt in attempts[:-1]:
        log = attempt["log"]
        assert "received SIGUSR1" in log, log[-3000:]
        stop = re.search(r"Stopped by SIGUSR1 at step (\d+); checkpoint .*checkpoint-(\d+)", log)
        assert stop and stop.group(1) == stop.group(2), log[-3000:]
        print(f"attempt {attempt['attempt']} (job {attempt['job']}) stopped at step {stop[1]}")
        state = cluster.job(attempt["job"])
        assert (state["JobState"], state["ExitCode"]) == ("FAILED", "75:0"), state
        assert attempt["successor"] is not None
    # Each retry is the pre-submitted successor of the one before, logging to -retry<N>.
    for before, after in itertools.pairwise(attempts):
        assert after["job"] == before["successor"]
        assert after["path"].name == f"{RUN_NAME}-retry{after['attempt']}.out"
        assert after["path"].with_suffix(".err").is_file()
    # The last attempt completed and cancelled its spare successor.
    last = attempts[-1]
    assert cluster.job(last["job"])["JobState"] == "COMPLETED"
    match = re.search(r"run completed: cancelled successor (\d+)", last["log"])
    assert match and match.group(1) == last["successor"], last["log"][-3000:]
    assert cluster.job(last["successor"])["JobState"] == "CANCELLED"
    assert not (submitted.submit_dir / "out" / f"{RUN_NAME}-retry{len(attempts)}.out").exists()
    assert not cluster.queue()

    # Global steps continue across the runs of the job: none skipped, none trained twice.
    job = submitted.artifacts / WEIRD_SUBDIR / "outputs/train_sft" / PREFIX / RUN_NAME
    runs = sorted((job / "runs").iterdir())
    assert len(runs) == len(attempts)
    steps: list[int] = []
    for i, run in enumerate(runs):
        run_steps = [m["step"] for m in read_metrics(run) if "loss" in m]
        if i:
            assert f"Resumed at step {steps[-1]} " in attempts[i]["log"]
        steps += run_steps
    assert steps == list(range(1, submitted.max_steps + 1))
    (state_file,) = job.glob(f"checkpoints/*/checkpoint-{submitted.max_steps}/trainer_state.json")
    state = json.loads(state_file.read_text())
    assert state["global_step"] == submitted.max_steps
    assert state["samples_seen"] == submitted.max_steps * 8

    # Same final weights as the uninterrupted run.
    finish(submitted.reference, timeout=600)
    (resumed,) = job.glob("checkpoints/*/final-model/model.safetensors")
    (straight,) = (submitted.artifacts / "private/outputs/train_sft/reference").rglob(
        "final-model/model.safetensors"
    )
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_values_with_spaces_quotes_dollars_reach_the_resolved_config(
    submitted: Submitted,
) -> None:
    submitted.cluster.wait_until_idle({RUN_NAME}, timeout=900)
    job = submitted.artifacts / WEIRD_SUBDIR / "outputs/train_sft" / PREFIX / RUN_NAME
    runs = sorted((job / "runs").iterdir())
    assert runs
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["artifacts_subdir"] == WEIRD_SUBDIR
        assert config["wandb"]["project"] == WEIRD_PROJECT
        assert config["job_subdir"] == f"{PREFIX}/{RUN_NAME}"
        assert config["wandb"]["run_name"] == RUN_NAME
        assert config["wandb"]["tags"] == [PREFIX, "tiny", "tiny-tasks"]
        assert config["resuming"]["resume"] is True


def test_always_failing_job_stops_after_max_retries(submitted: Submitted) -> None:
    cluster = submitted.cluster
    cluster.wait_until_idle({FAIL_NAME}, timeout=600)
    attempts = chain(submitted.fail_out.parent, FAIL_NAME)
    assert len(attempts) == FAIL_RETRIES + 1
    for attempt in attempts:
        assert "failing on purpose" in attempt["log"]
        assert cluster.job(attempt["job"])["JobState"] == "FAILED"
    assert attempts[-1]["successor"] is None
    assert f"is the last (MAX_RETRIES={FAIL_RETRIES})" in attempts[-1]["log"]
    assert "no retry left" in attempts[-1]["log"]
    assert not (submitted.fail_out.parent / f"{FAIL_NAME}-retry{FAIL_RETRIES + 1}.out").exists()


def test_stop_signal_before_the_trainer_listens_is_repeated(tmp_path: Path) -> None:
    """The node-level wrapper (outside SLURM it runs the launcher here): a USR1 that comes while
    Python is still starting, ignored by the launcher and not yet handled by the trainer, is
    repeated until the trainer checkpoints and stops; the wrapper exits 75."""
    artifacts = tmp_path / "artifacts"
    env = job_env(artifacts, STOP_RESEND_SECONDS="2")
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    proc = subprocess.Popen(
        ["bash", str(SUBMIT_SCRIPTS_DIR / "unattended-accelerate.sh"),
         "--config_file", str(ACCELERATE_CONFIGS_DIR / "cpu.yaml"), "-m", "post_training.train_sft",
         *QUICK, "training_args.max_steps=100000", "resuming.resume=true", "job_subdir=early"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(1)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-4000:]
    assert "received SIGUSR1: forwarding it to the launcher's process group" in output
    stop = re.search(r"Stopped by SIGUSR1 at step (\d+)", output)
    assert stop, output[-4000:]
    checkpoints = artifacts / "private/outputs/train_sft/early/checkpoints"
    assert list(checkpoints.glob(f"*/checkpoint-{stop[1]}/trainer_state.json"))
