"""Real SLURM, two nodes on this host: ``python -m post_training.submit`` end to end, and a
two-node data-parallel run through the wrappers' multi-node launch.

The cluster (tests/slurm_cluster.py, ``nodes=2``) runs one slurmd per emulated node on this host
(``slurmd -N <name>``, a port each); Debian's slurmd 22.05 runs two such daemons side by side, so
the two-node job is a real ``sbatch --nodes=2`` allocation: ``recursive-unattended-accelerate.sh``
starts one task per node with ``srun``, and each runs ``accelerate launch --num_machines 2
--machine_rank <SLURM_NODEID> --main_process_ip <first node> --main_process_port <port>``
(static rendezvous, one process per node, gloo on CPU).

Both jobs are submitted by the CLI at once (``slurm.dry_run=false``): a one-process run (per-device
batch 16) and the two-node run (2 × 8, ``slurm.accelerate=ddp``), the same global batch of 16, three
steps each. The first must complete and write its final model; the second must reach the same
weights (atol 1e-5).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .conftest import QUICK, REPO, final_weights, read_metrics, run_dirs
from .slurm_cluster import SlurmCluster, slurm_cluster
from .test_slurm import job_env

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

STEPS = 3
BASE = [
    *(arg for arg in QUICK if "batch_size" not in arg and "accumulation" not in arg),
    f"training_args.max_steps={STEPS}",
    "training_args.max_grad_norm=null",
    "slurm.global_batch_size=16",
    "slurm.time=00:10:00",
    "slurm.dry_run=false",
]
ONE, TWO, ZERO3 = "one-process", "two-nodes", "two-nodes-zero3"


@dataclass
class Submitted:
    cluster: SlurmCluster
    artifacts: Path
    job_ids: dict[str, str]
    outputs: dict[str, str]
    submit_dir: Path
    started: float


def submit(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "post_training.submit", "train_sft", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


@pytest.fixture(scope="module")
def submitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    with slurm_cluster(nodes=2) as cluster:
        tmp = tmp_path_factory.mktemp("slurm-submit")
        artifacts, submit_dir = tmp / "artifacts", tmp / "submit"
        env = job_env(artifacts, SLURM_CONF=str(cluster.conf))
        started = time.monotonic()
        outputs, job_ids = {}, {}
        for name, extra in (
            (ONE, ["training_args.per_device_train_batch_size=16"]),
            (TWO, ["training_args.per_device_train_batch_size=8", "slurm.nodes=2",
                   "slurm.accelerate=ddp"]),
            (ZERO3, ["training_args.per_device_train_batch_size=8", "slurm.nodes=2",
                     "slurm.accelerate=ds-zero3"]),
        ):  # fmt: skip
            outputs[name] = submit(
                [*BASE, *extra, f"data.cache_dir={tmp / 'cache' / name}",
                 f"slurm.job_name={name}", f"slurm.submit_dir={submit_dir}"],
                env,
            )  # fmt: skip
            match = re.search(r"^Submitted batch job (\d+)$", outputs[name], re.MULTILINE)
            assert match, outputs[name]
            job_ids[name] = match.group(1)
        yield Submitted(cluster, artifacts, job_ids, outputs, submit_dir, started)


def log(submitted: Submitted, name: str) -> str:
    (out,) = submitted.submit_dir.glob(f"{name}-*/out/{name}.out")
    return out.read_text() + out.with_suffix(".err").read_text()


def wait(submitted: Submitted, name: str) -> None:
    submitted.cluster.wait_until_idle({name}, timeout=600)
    state = submitted.cluster.job(submitted.job_ids[name])
    assert state["JobState"] == "COMPLETED", f"{state}\n{log(submitted, name)[-5000:]}"
    print(f"{name}: done {time.monotonic() - submitted.started:.0f}s after submission")


def test_submit_cli_runs_a_tiny_sft_to_its_final_model(submitted: Submitted) -> None:
    out = submitted.outputs[ONE]
    assert "global batch 16 = 1 node(s) × 1 device(s) × per-device 16 × accumulation 1" in out
    wait(submitted, ONE)
    text = log(submitted, ONE)
    assert "run completed: cancelled successor" in text, text[-3000:]
    (final,) = submitted.artifacts.glob(
        f"private/outputs/train_sft/submit/{ONE}/checkpoints/*/final-model/model.safetensors"
    )
    assert final.stat().st_size > 0
    (run,) = run_dirs(submitted.artifacts, f"submit/{ONE}")
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("name", [TWO, ZERO3])
def test_two_nodes_through_the_wrapper_equal_one_process(submitted: Submitted, name: str) -> None:
    """DDP, and DeepSpeed ZeRO-3 (gloo on CPU) sharded over the two nodes."""
    if name == ZERO3 and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed (the dev extra installs it)")
    wait(submitted, name)
    text = log(submitted, name)
    port = re.search(r"2 node\(s\) × 1 device\(s\), venv, rendezvous (\S+):(\d+)", text)
    assert port and port.group(1) == submitted.cluster.node, text[-3000:]
    for rank in range(2):  # one launcher per node, the rendezvous on the first node
        assert re.search(
            rf"node {rank} of 2 on \S+: accelerate launch --num_machines 2 --num_processes 2 "
            rf"--machine_rank {rank} --main_process_ip {port[1]} --main_process_port {port[2]} ",
            text,
        ), text[-3000:]
    job = submitted.cluster.job(submitted.job_ids[name])
    assert job["NumNodes"] == "2" and job["NodeList"] != submitted.cluster.node, job
    (run,) = run_dirs(submitted.artifacts, f"submit/{name}")
    assert (run / "rank-1").is_dir(), "rank 1 (the second node) ran in the same run dir"
    assert read_metrics(run)[0]["num_samples"] == 16
    wait(submitted, ONE)
    one = final_weights(submitted.artifacts, f"submit/{ONE}")
    two = final_weights(submitted.artifacts, f"submit/{name}")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
