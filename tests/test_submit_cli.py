"""``python -m post_training.submit``: the line it writes is the template engine's line for the
same run; its settings, defaults and one-line refusals (no SLURM: a stand-in ``sbatch``)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from post_training import submit as cli
from post_training.launch.submit import Model, alignment_runs, sbatch_line, sft_runs

from .conftest import REPO

NOW = datetime(2026, 5, 4, 3, 2)
DATE = "2026-05-04-03-02"


@pytest.fixture(autouse=True)
def site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """setup.sh as the tests expect it: 1 device per node, artifacts in the temp dir."""
    monkeypatch.setenv("DEVICES_PER_NODE", "1")
    monkeypatch.setenv("POST_TRAINING_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    for name in ("MAX_RETRIES", "SBATCH_PARTITION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``sbatch`` first on PATH: records its arguments (NUL-separated), prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch-args"
    script = bin_dir / "sbatch"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\0" "$@" > {shlex.quote(str(record))}\n'
        'if [[ -n ${FAKE_SBATCH_FAIL:-} ]]; then echo "sbatch: error: $FAKE_SBATCH_FAIL" >&2; '
        "exit 1; fi\n"
        "echo 'Submitted batch job 4242'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def planned(*argv: str) -> cli.Plan:
    return cli.plan(cli.parse(["train_sft", *argv] if "=" in argv[0] else list(argv)))


# ------------------------------------------------------------ the template engine's line
SWEEP_ARGS = [
    "model=tiny",
    "trainer=plw",
    "training_args.learning_rate=0.001",
    "training_args.per_device_train_batch_size=4",
    "slurm.nodes=2",
    "slurm.accelerate=ddp",
    "slurm.global_batch_size=32",
    "slurm.prefix=exp",
    "slurm.partition=normal",
    "slurm.time=01:30:00",
]


def test_training_line_equals_the_template_engine_line(tmp_path: Path) -> None:
    (run,) = sft_runs(
        prefix="exp",
        models=[Model("tiny", nodes=2, per_device_batch_size=4, accelerate="ddp")],
        datasets=["tiny-tasks"],
        hyperparameters={"trainer": ["plw"], "training_args.learning_rate": [1e-3]},
        global_batch_size=32,
        devices=1,
        artifacts_subdir="private",
    )
    plan = planned(*SWEEP_ARGS)
    assert plan.name == run.name == "tiny_tiny-tasks_trainer-plw_learning_rate-0.001"
    out = tmp_path / "out"
    expected = sbatch_line(run, out, "01:30:00", sbatch_options=("--partition=normal",))
    assert cli.line(plan, out) == expected
    words = shlex.split(expected)
    assert "training_args.gradient_accumulation_steps=4" in words  # 32 / (2 × 1 × 4)
    assert "job_subdir=exp/tiny_tiny-tasks_trainer-plw_learning_rate-0.001" in words
    assert "resuming.resume=true" in words


@pytest.mark.parametrize("partitions", [1, 4])
def test_stage_line_equals_the_template_engine_line(tmp_path: Path, partitions: int) -> None:
    (run,) = alignment_runs(
        stage="generate_ref_completions",
        prefix="exp",
        models=[Model("tiny", nodes=1, accelerate="cpu")],
        datasets=["tiny-tasks"],
        hyperparameters={"generation.num_completions": [2]},
        partitions=partitions,
        artifacts_subdir="private",
    )
    plan = planned(
        "generate_ref_completions",
        "generation.num_completions=2",
        f"slurm.partitions={partitions}",
        "slurm.prefix=exp",
        "slurm.devices_per_node=1",
    )
    assert cli.line(plan, tmp_path) == sbatch_line(run, tmp_path, "04:00:00")
    assert ("--array=0-3" in cli.line(plan, tmp_path)) == (partitions == 4)
    assert plan.env == {"DEVICES_PER_NODE": "1"}


def test_submitted_line_is_the_copied_templates_line(
    tmp_path: Path, fake_sbatch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's two ways to one run: a copied template (submit.sh run by bash) and the CLI
    (slurm.dry_run=false) hand sbatch the same words, the log paths apart."""
    copy = tmp_path / "sft" / "1-exp"
    shutil.copytree(REPO / "reproducibility-scripts/sft/0-template", copy)
    spec = importlib.util.spec_from_file_location("template_cli_test", copy / "generate_submit.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)
    template.PREFIX, template.TIME, template.GLOBAL_BATCH_SIZE = "exp", "01:30:00", 32
    template.ARTIFACTS_SUBDIR = "private"
    template.MODELS = [Model("tiny", nodes=2, per_device_batch_size=4, accelerate="ddp")]
    template.HYPERPARAMETERS = {"trainer": ["plw"], "training_args.learning_rate": [1e-3]}
    template.OVERRIDES, template.ENV, template.SHORT_NAMES = {}, {}, {}
    path = template.main([])
    subprocess.run(["bash", str(path)], check=True, capture_output=True)
    from_template = fake_sbatch.read_bytes().split(b"\0")[:-1]

    submit_dir = tmp_path / "cli"
    argv = [
        "train_sft",
        *(a for a in SWEEP_ARGS if a != "slurm.partition=normal"),
        f"slurm.submit_dir={submit_dir}",
        "slurm.dry_run=false",
    ]
    assert cli.main(argv, now=NOW) == 0
    out = capsys.readouterr().out
    name = "tiny_tiny-tasks_trainer-plw_learning_rate-0.001"
    assert "Submitted batch job 4242" in out
    folder = submit_dir / f"{name}-{DATE}"
    assert (folder / "out").is_dir() and (folder / "submit.sh").is_file()
    assert f"logs: {folder}/out/{name}.out" in out
    from_cli = fake_sbatch.read_bytes().split(b"\0")[:-1]

    def logs_apart(words: list[bytes], folder: Path) -> list[bytes]:
        return [w.replace(str(folder).encode(), b"<folder>") for w in words]

    assert logs_apart(from_cli, folder) == logs_apart(from_template, path.parent)
    assert f"--output={folder}/out/{name}.out".encode() in from_cli
    # The command is recorded in the submit.sh it wrote.
    assert "# Generated by python -m post_training.submit train_sft model=tiny" in (
        (folder / "submit.sh").read_text()
    )


# --------------------------------------------------------------------------- defaults
def test_dry_run_is_the_default_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(["train_sft", "training_args.max_steps=3", "training_args.num_train_epochs=null"])
        == 0
    )
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("sbatch ")]
    words = shlex.split(line)
    assert words[1:4] == [
        "--job-name=tiny_tiny-tasks_max_steps-3_num_train_epochs-null",
        "--nodes=1",
        "--time=04:00:00",
    ]
    submit_dir = tmp_path / "artifacts/private/submit"
    assert words[4] == f"--output={submit_dir}/{words[1][11:]}-<date>/out/{words[1][11:]}.out"
    # One process: the config's own global batch (8 × 4); the config's accelerate choice.
    assert "training_args.gradient_accumulation_steps=4" in words
    assert "accelerate=cpu" in words and "resuming.resume=true" in words
    assert "dry run: nothing written" in out
    assert not (tmp_path / "artifacts").exists()


def test_global_batch_defaults_and_accumulation_as_given() -> None:
    # 4 processes: the config's global batch 32 = 4 × 8 × 1.
    plan = planned(
        "model=tiny", "slurm.nodes=2", "slurm.accelerate=ddp", "slurm.devices_per_node=2"
    )
    assert "training_args.gradient_accumulation_steps=1" in plan.run.args
    assert plan.env == {"DEVICES_PER_NODE": "2"}  # exported in submit.sh: the job uses it too
    # An accumulation given on the command line is kept (the global batch follows the layout).
    plan = planned(
        "training_args.gradient_accumulation_steps=3", "slurm.nodes=2", "slurm.accelerate=ddp"
    )
    assert "training_args.gradient_accumulation_steps=3" in plan.run.args
    assert "global batch 48 = 2 node(s) × 1 device(s) × per-device 8 × accumulation 3" in (
        plan.summary
    )


def test_overrides_pass_through_as_typed() -> None:
    """Hydra values are not re-quoted: a number stays a number, an interpolation resolves."""
    plan = planned(
        "training_args.learning_rate=1e-3",
        "wandb.project=${oc.env:USER,me}",
        "wandb.entity='a b'",
        "slurm.job_name=typed",
    )
    assert plan.name == "typed"
    assert "training_args.learning_rate=1e-3" in plan.run.args
    assert "wandb.project=${oc.env:USER,me}" in plan.run.args
    assert "wandb.entity='a b'" in plan.run.args  # Hydra's quotes, kept for Hydra


def test_long_derived_names_are_cut_with_a_hash() -> None:
    args = ["trainer=plw", f"wandb.project={'p' * 120}"]
    plan = planned(*args)
    assert len(plan.name) == cli.MAX_NAME and plan.name.startswith("tiny_tiny-tasks_trainer-plw_")
    assert plan.name == planned(*args).name  # the same command: the same run
    assert plan.name != planned("trainer=plw", f"wandb.project={'p' * 119}q").name


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "name an entrypoint: train_sft, train_preference, train_reward"),
        (["evaluate"], "unknown entrypoint 'evaluate': post_training.submit runs train_sft"),
        (["train_sft", "slurm.nodez=2"], "unknown key 'slurm.nodez'; slurm keys: slurm.nodes"),
        (["train_sft", "slurm.time=2h"], "slurm.time='2h': a wall time is minutes"),
        (["train_sft", "slurm.time=1:75:00"], "slurm.time='1:75:00': a wall time is minutes"),
        (["train_sft", "slurm.nodes=0"], "slurm.nodes='0': must be a positive integer"),
        (["train_sft", "slurm.dry_run=maybe"], "slurm.dry_run='maybe': must be true or false"),
        (["train_sft", "slurm.partition=a b"], "slurm.partition='a b': must be a non-empty word"),
        (["train_sft", "slurm.job_name=a/b"], "slurm.job_name='a/b': use only letters"),
        (["train_sft", "slurm.accelerate=zero9"], "slurm.accelerate='zero9': no such accelerate"),
        (["train_sft", "slurm.nodes=1", "slurm.nodes=2"], "slurm.nodes is given twice"),
        (["train_sft", "+slurm.nodes=2"], "'+slurm.nodes=2': slurm.* settings take no +/~ prefix"),
        (["train_sft", "job_subdir=x"], "job_subdir=x: set by post_training.submit"),
        (["train_sft", "resuming.resume=false"], "resuming.resume=false: set by"),
        (["train_sft", "--multirun"], "'--multirun': options are not passed on"),
        (["train_sft", "trainer"], "'trainer': expected key=value"),
        (["train_sft", "slurm.partitions=2"], "slurm.partitions: only for the alignment"),
        (
            ["compute_rewards", "slurm.global_batch_size=8"],
            "slurm.global_batch_size: only for the training entrypoints",
        ),
        (
            ["train_sft", "slurm.nodes=2"],
            "slurm.accelerate=cpu starts one process, but 2 node(s) × 1 device(s) = 2 processes",
        ),
        (
            ["train_sft", "slurm.nodes=3", "slurm.accelerate=ddp"],
            "global batch 32 from the config's 8 × 4 (set slurm.global_batch_size to choose): "
            "global batch size 32 is not a whole multiple of nodes × devices per node × "
            "per-device batch = 3 × 1 × 8 = 24",
        ),
        (
            [
                "train_sft",
                "training_args.gradient_accumulation_steps=2",
                "slurm.global_batch_size=64",
            ],
            "training_args.gradient_accumulation_steps and slurm.global_batch_size both set",
        ),
        (
            ["train_sft", "accelerate=ddp", "slurm.accelerate=fsdp"],
            "accelerate=ddp and slurm.accelerate=fsdp differ",
        ),
        (["train_sft", "training_args.nope=1"], "Could not override 'training_args.nope'. To"),
        (
            ["train_sft", "training_args.learning_rate=-1", "slurm.job_name=x"],
            "run x: invalid config: training_args.learning_rate=-1: must be greater than 0",
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}"), captured.err
    assert captured.err.count("\n") == 1 and not captured.out
    assert not (tmp_path / "artifacts").exists()


def test_a_failed_sbatch_is_one_line_and_leaves_no_folder(
    tmp_path: Path, fake_sbatch: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "invalid partition specified: gpu")
    submit_dir = tmp_path / "cli"
    argv = ["train_sft", f"slurm.submit_dir={submit_dir}", "slurm.dry_run=false"]
    assert cli.main(argv, now=NOW) == 2
    err = capsys.readouterr().err
    assert err == "error: sbatch failed (exit 1): sbatch: error: invalid partition specified: gpu\n"
    assert list(submit_dir.iterdir()) == []


def test_help_and_the_module_entrypoint() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "post_training.submit", "--help"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "slurm.global_batch_size" in proc.stdout and "slurm.dry_run [true]" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "post_training.submit", "train_dpo"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown entrypoint 'train_dpo'")
    assert "Traceback" not in proc.stderr
