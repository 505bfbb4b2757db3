"""Shared fixtures: offline Hugging Face, artifacts in a temp dir, helpers to run entrypoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite runs on pytest-xdist workers (``-n auto --dist loadfile`` in pyproject.toml: a file's
# tests, and so its module fixtures, stay on one worker). Each worker, and every process its tests
# start, gets an equal share of the cores, so the workers do not oversubscribe them; on the tiny
# model a training step is mostly Python and small ops, one thread is ~15% slower than two, and
# two workers on 2 cores finish the suite in well under the time of one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]

# Files that take minutes, longest first: xdist hands each worker two files to start with and the
# rest as they free up, so these start at once and the short files fill the gaps. Only the
# schedule depends on this list (a file missing from it runs after them, in name order).
SLOW_FILES = (
    "test_e2e_main_job.py",
    "test_e2e_trainers.py",
    "test_scale_out.py",
    "test_compile.py",
    "test_e2e_alignment.py",
    "test_slurm.py",
    "test_e2e_train.py",
    "test_damaged_checkpoints.py",
    "test_config_errors.py",
    "test_real_families_train.py",
    "test_e2e_preference.py",
    "test_presets.py",
    "test_benchmark_run.py",
    "test_model_merging.py",
    "test_slurm_submit.py",
)


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's (serial runs: ``-n 0``)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4 (beyond that the longest file bounds the wall
    time, and each worker holds its own imports); ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(4, len(os.sched_getaffinity(0))))


COLLECTED: dict[str, Any] = {}
"""How many tests this session collected, before ``-m`` deselects any, and whether they were
the whole suite (``tests/test_readme.py`` compares the README's test count with it)."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the files of ``SLOW_FILES`` first, in its order; the others keep theirs."""
    COLLECTED["count"] = len(items)
    COLLECTED["whole_suite"] = (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
    )
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


# Short, deterministic runs of the tiny model.
QUICK = (
    "wandb.mode=disabled",
    "tensorboard=false",
    "training_args.num_train_epochs=null",
    "training_args.per_device_train_batch_size=8",
    "training_args.gradient_accumulation_steps=1",
    "training_args.logging_steps=1",
    "training_args.eval_steps=null",
    "evaluation.at_end=false",
    "dataset.max_eval_examples=16",
)


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def run_entrypoint(
    module: str,
    overrides: Sequence[str],
    artifacts: Path,
    check: bool = True,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m post_training.<module>`` with artifacts under ``artifacts`` (``env``: extra
    environment variables)."""
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", f"post_training.{module}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
            f"STDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_two_ranks(
    module: str, overrides: Sequence[str], artifacts: Path, port: int, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """``post_training.<module>`` launched on two CPU ranks (``accelerate launch --multi_gpu``:
    gloo DDP), one thread each, on ``port``; asserts it exits 0."""
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), "-m", f"post_training.{module}",
    ]  # fmt: skip
    proc = subprocess.run(
        [*launch, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def start_entrypoint(
    module: str, overrides: Sequence[str], artifacts: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", f"post_training.{module}", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_killed_at(
    module: str, overrides: Sequence[str], artifacts: Path, point: str
) -> subprocess.CompletedProcess[str]:
    """Run an entrypoint that kills itself (SIGKILL) at the failpoint ``point``
    (``POST_TRAINING_FAILPOINT``, :mod:`post_training.utils.failpoints`); checks it did."""
    proc = run_entrypoint(
        module, overrides, artifacts, check=False, env={"POST_TRAINING_FAILPOINT": point}
    )
    assert proc.returncode == -9, f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def final_weights(artifacts: Path, job: str, entrypoint: str = "train_sft") -> dict[str, Any]:
    """The final model's tensors of ``job``."""
    from safetensors.torch import load_file

    (model,) = job_dir(artifacts, job, entrypoint).rglob("final-model/model.safetensors")
    return load_file(model)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_dir(
    artifacts: Path, job: str, entrypoint: str = "train_sft", subdir: str = "private"
) -> Path:
    return artifacts / subdir / "outputs" / entrypoint / job


def run_dirs(artifacts: Path, job: str, entrypoint: str = "train_sft") -> list[Path]:
    return sorted((job_dir(artifacts, job, entrypoint) / "runs").iterdir())


def save_initial_model(directory: Path, overrides: Sequence[str] = ()) -> Path:
    """The untrained start of a ``train_sft`` config (the seeded init of the tiny model), saved
    as a checkpoint with its tokenizer: what training 0 steps would give (which the config now
    refuses: ``training_args.max_steps`` must be ≥ 1)."""
    from hydra import compose, initialize_config_dir

    from post_training.modeling.loading import load_model, load_tokenizer
    from post_training.utils.config import CONFIGS_DIR, to_container

    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        config = to_container(compose("train-sft", overrides=list(overrides)))
    tokenizer = load_tokenizer(config["model"])
    model = load_model(config["model"], tokenizer, config["model_args"])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """For a test that builds a TRL / transformers trainer in this process: that sets
    accelerate's process-wide state (its own mixed precision and device choices), which a later
    in-process ``Accelerator`` of ours would then refuse to change (``AcceleratorState has
    already been initialized``). Cleared before and after the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_sft_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly SFT-ed tiny model (300 steps), shared by the preference and alignment e2e
    tests as their starting point; its held-out accuracy is in ``eval-tiny-tasks.json``."""
    artifacts = tmp_path_factory.mktemp("sft-start")
    args = [
        "wandb.mode=disabled",
        "tensorboard=false",
        "training_args.logging_steps=5",
        "job_subdir=sft",
        "training_args.num_train_epochs=null",
        "training_args.max_steps=300",
    ]
    run_entrypoint("train_sft", args, artifacts)
    (final,) = job_dir(artifacts, "sft").rglob("final-model")
    return final
