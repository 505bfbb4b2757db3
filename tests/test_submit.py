"""Submit-line generator: arithmetic, naming, Hydra + shell quoting, templates (no SLURM)."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shlex
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from post_training.errors import SubmitError
from post_training.launch import submit
from post_training.launch.submit import (
    Model,
    Run,
    gradient_accumulation,
    hydra_override,
    hydra_value,
    job_id,
    sbatch_line,
    sft_runs,
    write_submit,
)
from post_training.utils.config import CONFIGS_DIR, to_container

from .conftest import REPO

SCRIPTS = REPO / "cscs-shared-submit-scripts"
TEMPLATES = REPO / "reproducibility-scripts"
NASTY = [
    "/data/my dir/train.jsonl",
    "it's",
    'say "hi"',
    "$HOME and ${HOME}",
    "${oc.env:HOME}",
    "\\${x}",
    "a\\\\${x}",
    "back\\slash",
    "trailing\\",
    "trailing\\\\",
    "quote\\'mix",
    "\\'",
    "a;b && rm -rf /",
    "`id` $(id)",
    "a,b",
    "k=v",
    "[1, 2]",
    "{a: b}",
    "(x)",
    "  spaces  ",
    "",
    "%j %%",
    "ünïcødé ✓",
    "null",
    "true",
    "1e-3",
    "-5",
    "inf",
    "line\nbreak",
    "tab\there",
    "#hash",
    "~tilde",
    "*glob?",
]


# ------------------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize(
    ("global_batch", "nodes", "devices", "per_device", "expected"),
    [(32, 1, 4, 8, 1), (128, 2, 4, 8, 2), (64, 1, 1, 8, 8), (8, 1, 1, 8, 1), (96, 3, 4, 2, 4)],
)
def test_gradient_accumulation(global_batch, nodes, devices, per_device, expected) -> None:
    assert gradient_accumulation(global_batch, nodes, devices, per_device) == expected


@pytest.mark.parametrize(
    ("global_batch", "nodes", "devices", "per_device"),
    [(30, 1, 4, 8), (16, 1, 4, 8), (100, 2, 4, 4), (48, 1, 4, 8)],
)
def test_gradient_accumulation_refuses_fractional_splits(
    global_batch, nodes, devices, per_device
) -> None:
    with pytest.raises(SubmitError, match="not a whole multiple") as err:
        gradient_accumulation(global_batch, nodes, devices, per_device)
    assert f"{nodes} × {devices} × {per_device} = {nodes * devices * per_device}" in str(err.value)


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True])
def test_gradient_accumulation_refuses_non_positive_integers(bad) -> None:
    with pytest.raises(SubmitError, match="positive integer"):
        gradient_accumulation(bad, 1, 1, 8)


# ---------------------------------------------------------------------------------- naming
def test_job_id_from_swept_values() -> None:
    values = {"trainer": "plw", "training_args.learning_rate": 2e-05, "model_args.use_peft": True}
    assert (
        job_id("llama-3.2-1b-instruct", "tiny-tasks", values, {"training_args.learning_rate": "lr"})
        == "llama-3.2-1b-instruct_tiny-tasks_trainer-plw_lr-2e-05_use_peft-true"
    )
    assert job_id("m", "d", {"x": 0.001, "y": [1, 2], "z": None}) == "m_d_x-0.001_y-1+2_z-none"
    # Paths, spaces and quotes never reach a name.
    name = job_id("m", "d", {"dataset.train.path": "/a b/it's $x.jsonl"})
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name), name


# ------------------------------------------------------------------------- Hydra quoting
def test_hydra_value_plain_and_typed() -> None:
    assert hydra_value("tiny") == "tiny"
    assert hydra_value("/data/x-1.jsonl") == "/data/x-1.jsonl"
    assert hydra_value(None) == "null"
    assert hydra_value(True) == "true"
    assert hydra_value(8) == "8"
    assert hydra_value(2e-05) == "2e-05"
    assert hydra_value(["a", "b c", 1]) == "[a,'b c',1]"
    assert hydra_value({"a": 1, "b": "x y"}) == "{a:1,b:'x y'}"
    assert hydra_value("null") == "'null'" and hydra_value("1e-3") == "'1e-3'"
    assert hydra_value("it's") == "'it\\'s'"
    assert hydra_value("${x}") == "'\\${x}'"
    with pytest.raises(SubmitError):
        hydra_value(object())
    with pytest.raises(SubmitError):
        hydra_override("bad key", 1)


def _composed(overrides: list[str], config: str = "train-sft") -> dict:
    with initialize_config_dir(str(CONFIGS_DIR), version_base=None):
        return to_container(compose(config, overrides=overrides))


def test_nasty_strings_reach_the_resolved_config_verbatim() -> None:
    """Through both layers: the shell (shlex) and Hydra/OmegaConf (hydra_value)."""
    rng = random.Random(0)
    alphabet = "ab $'\"\\{}[](),;=:`#%*?~\n"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    values = [*NASTY, *fuzz]
    words = [
        *shlex.split(  # what the shell hands over
            shlex.join(hydra_override(f"+quoting.v{i}", v) for i, v in enumerate(values))
        ),
        hydra_override("wandb.project", NASTY[0]),
        hydra_override("wandb.tags", NASTY),
    ]
    resolved = _composed(words)
    for i, value in enumerate(values):
        assert resolved["quoting"][f"v{i}"] == value, (value, hydra_value(value))
    assert resolved["wandb"]["project"] == NASTY[0]
    assert resolved["wandb"]["tags"] == NASTY


def test_sbatch_line_survives_bash_word_for_word(tmp_path: Path) -> None:
    """The generated line, run by bash, hands sbatch exactly the intended arguments."""
    out_dir = tmp_path / "exp 'a' \"b\" $HOME; %x" / "out"
    args = tuple(hydra_override("wandb.project", v) for v in NASTY)
    line = sbatch_line(Run("name", 2, args), out_dir, "01:00:00")
    proc = subprocess.run(
        ["bash", "-c", 'sbatch() { printf "%s\\0" "$@"; }\n' + line],
        capture_output=True,
        text=True,
        check=True,
    )
    argv = proc.stdout.split("\0")[:-1]
    assert argv[:5] == [
        "--job-name=name",
        "--nodes=2",
        "--time=01:00:00",
        f"--output={str(out_dir).replace('%', '%%')}/name.out",
        f"--error={str(out_dir).replace('%', '%%')}/name.err",
    ]
    assert argv[5] == str(SCRIPTS / "recursive-unattended-accelerate.sh")
    assert tuple(argv[6:]) == args


def test_array_interpolations_resolve_from_the_task_id(monkeypatch: pytest.MonkeyPatch) -> None:
    (run,) = submit.alignment_runs(
        stage="generate_ref_completions",
        prefix="exp",
        models=[Model("tiny")],
        datasets=["tiny-tasks"],
        hyperparameters={},
        partitions=4,
        artifacts_subdir="shared",
    )
    assert run.array == "0-3" and run.array_size == 4
    assert run.args[:4] == (
        "--config_file",
        str(CONFIGS_DIR / "accelerate/cpu.yaml"),
        "-m",
        "post_training.data_alignment.generate_ref_completions",
    )
    overrides = dict(arg.split("=", 1) for arg in run.args[4:])
    assert overrides["partition.count"] == "4"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    # Every override the generator writes is accepted by the stage's own config.
    resolved = _composed(list(run.args[4:]), "generate-ref-completions")
    assert resolved["partition"] == {"index": 3, "count": 4}
    assert resolved["job_subdir"] == ("exp/generate_ref_completions_tiny_tiny-tasks/partition-3")
    assert resolved["wandb"]["run_name"] == "generate_ref_completions_tiny_tiny-tasks-partition-3"
    line = sbatch_line(run, Path("/x/out"), "1:00:00")
    assert "--array=0-3" in shlex.split(line)
    assert "--output=/x/out/generate_ref_completions_tiny_tiny-tasks-%a.out" in shlex.split(line)


def test_single_partition_and_merge_stages_are_single_jobs() -> None:
    common = {
        "prefix": "exp",
        "models": [Model("tiny")],
        "datasets": ["tiny-tasks"],
        "hyperparameters": {},
        "partitions": 4,
        "artifacts_subdir": "shared",
    }
    (merge,) = submit.alignment_runs(stage="merge_partitions", **common)
    assert merge.array is None and "partition.count=4" in merge.args
    assert not any(a.startswith("partition.index") for a in merge.args)
    (one,) = submit.alignment_runs(stage="filter_dataset_for_model", **{**common, "partitions": 1})
    assert one.array is None and "partition.index=0" in one.args
    with pytest.raises(SubmitError, match="unknown alignment stage"):
        submit.alignment_runs(stage="train", **common)


# ------------------------------------------------------------------------ runs and files
def test_sft_runs_sweep_and_identity_overrides() -> None:
    runs = sft_runs(
        prefix="exp",
        models=[Model("tiny", nodes=2, per_device_batch_size=4), Model("qwen3-0.6b")],
        datasets=["tiny-tasks"],
        hyperparameters={"trainer": ["sft", "plw"], "training_args.learning_rate": [1e-3]},
        global_batch_size=32,
        devices=4,
        artifacts_subdir="shared",
        overrides={"training_args.num_train_epochs": 3},
        short_names={"training_args.learning_rate": "lr"},
    )
    assert [r.name for r in runs] == [
        "tiny_tiny-tasks_trainer-sft_lr-0.001",
        "tiny_tiny-tasks_trainer-plw_lr-0.001",
        "qwen3-0.6b_tiny-tasks_trainer-sft_lr-0.001",
        "qwen3-0.6b_tiny-tasks_trainer-plw_lr-0.001",
    ]
    assert [r.nodes for r in runs] == [2, 2, 1, 1]
    first = dict(a.split("=", 1) for a in runs[0].args[4:])
    assert first["training_args.gradient_accumulation_steps"] == "1"  # 32 / (2 × 4 × 4)
    assert (
        dict(a.split("=", 1) for a in runs[2].args[4:])["training_args.gradient_accumulation_steps"]
        == "1"
    )  # 32 / (1 × 4 × 8)
    assert first["job_subdir"] == "exp/tiny_tiny-tasks_trainer-sft_lr-0.001"
    assert first["wandb.run_name"] == "tiny_tiny-tasks_trainer-sft_lr-0.001"
    assert first["wandb.tags"] == "[exp,tiny,tiny-tasks]"
    assert first["resuming.resume"] == "true"
    assert first["artifacts_subdir"] == "shared"
    assert first["training_args.num_train_epochs"] == "3"
    assert first["trainer"] == "sft" and first["model"] == "tiny"
    # Every override of a run composes (an unknown key would fail here).
    resolved = _composed(list(runs[1].args[4:]))
    assert resolved["training_args"]["learning_rate"] == 1e-3
    assert resolved["trainer"]["name"] == "plw"
    assert resolved["resuming"]["resume"] is True


def test_sweep_refuses_keys_the_generator_derives() -> None:
    common = {
        "prefix": "exp",
        "models": [Model("tiny")],
        "datasets": ["tiny-tasks"],
        "global_batch_size": 8,
        "devices": 1,
        "artifacts_subdir": "shared",
    }
    with pytest.raises(SubmitError, match="job_subdir"):
        sft_runs(hyperparameters={"job_subdir": ["a", "b"]}, **common)
    with pytest.raises(SubmitError, match="gradient_accumulation_steps"):
        sft_runs(
            hyperparameters={}, overrides={"training_args.gradient_accumulation_steps": 2}, **common
        )
    with pytest.raises(SubmitError, match="non-empty list"):
        sft_runs(hyperparameters={"trainer": "sft"}, **common)
    with pytest.raises(SubmitError, match="not a whole multiple"):
        sft_runs(hyperparameters={}, **{**common, "global_batch_size": 12})


def test_write_submit_layout_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runs = [Run("a", 1, ("x",)), Run("b", 4, ("y z",), array_size=2)]
    now = datetime(2026, 3, 4, 5, 6)
    path = write_submit(
        tmp_path, "my-exp", runs, "2:00:00", Path("gen.py"), {"MAX_RETRIES": "9"}, now=now
    )
    assert path == tmp_path / "my-exp-2026-03-04-05-06" / "submit.sh"
    assert (path.parent / "out").is_dir() and os.access(path, os.X_OK)
    text = path.read_text()
    assert "2 runs" not in text and "3 runs, 9 nodes in total" in text  # the array has 2 tasks
    assert f"source {SCRIPTS / 'setup.sh'}" in text
    assert "export MAX_RETRIES=9" in text
    lines = [line for line in text.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 2 and shlex.split(lines[1])[-1] == "y z"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    with pytest.raises(SubmitError, match="already exists"):
        write_submit(tmp_path, "my-exp", runs, "2:00:00", Path("gen.py"), now=now)
    with pytest.raises(SubmitError, match="share a name"):
        write_submit(tmp_path, "other", [runs[0], runs[0]], "1", Path("gen.py"), now=now)


def test_devices_per_node_comes_from_setup_sh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVICES_PER_NODE", raising=False)
    assert submit.devices_per_node() == 1
    monkeypatch.setenv("DEVICES_PER_NODE", "4")
    assert submit.devices_per_node() == 4
    monkeypatch.setenv("DEVICES_PER_NODE", "four")
    with pytest.raises(SubmitError, match="DEVICES_PER_NODE"):
        submit.devices_per_node()


# ------------------------------------------------------------------------------ templates
def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"template_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_template_writes_submit_sh_in_a_copied_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICES_PER_NODE", "1")
    copy = tmp_path / "sft" / "1-my-experiment"
    shutil.copytree(TEMPLATES / "sft/0-template", copy)
    path = _load(copy / "generate_submit.py").main([])
    assert path.parent.parent == copy
    assert re.fullmatch(r"sft-template-\d{4}(-\d\d){4}", path.parent.name)
    out = capsys.readouterr().out
    assert "4 runs, 4 nodes in total" in out
    lines = [line for line in path.read_text().splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 4
    words = shlex.split(lines[0])
    assert f"--output={path.parent}/out/tiny_tiny-tasks_trainer-sft_lr-0.001.out" in words
    assert "training_args.gradient_accumulation_steps=4" in words  # 32 / (1 × 1 × 8)


def test_a_sweep_with_a_bad_value_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run's config is composed and validated like its job will: one bad value in the
    sweep stops the generator with the run, the key, the value and the rule; nothing written."""
    monkeypatch.setenv("DEVICES_PER_NODE", "1")
    copy = tmp_path / "sft" / "1-bad"
    shutil.copytree(TEMPLATES / "sft/0-template", copy)
    template = _load(copy / "generate_submit.py")
    monkeypatch.setitem(template.HYPERPARAMETERS, "training_args.learning_rate", [1e-3, -1.0])
    with pytest.raises(submit.SubmitError) as error:
        template.main([])
    message = str(error.value)
    assert message.startswith("run tiny_tiny-tasks_trainer-sft_lr"), message
    assert "invalid config:" in message
    assert "training_args.learning_rate=-1.0: must be greater than 0" in message
    assert sorted(p.name for p in copy.iterdir()) == ["generate_submit.py"]
    monkeypatch.setitem(template.HYPERPARAMETERS, "trainer", ["sft", "dpo"])  # not an SFT loss
    monkeypatch.setitem(template.HYPERPARAMETERS, "training_args.learning_rate", [1e-3])
    with pytest.raises(submit.SubmitError, match="trainer-dpo"):
        template.main(["--dry-run"])


@pytest.mark.parametrize("stage", submit.ALIGNMENT_STAGES)
def test_alignment_templates_dry_run(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = _load(TEMPLATES / "alignment/0-template" / stage / "generate_submit.py").main(
        ["--dry-run"]
    )
    assert result is None
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("sbatch ")]
    assert f"post_training.data_alignment.{stage}" in shlex.split(line)
    assert ("--array=0-3" in line) == (
        stage not in {"filter_dataset_for_model", "merge_partitions"}
    )


# ------------------------------------------------------------------------- shell scripts
@pytest.mark.parametrize(
    "script", ["setup.sh", "unattended-accelerate.sh", "recursive-unattended-accelerate.sh"]
)
def test_shell_scripts_parse_and_pass_shellcheck(script: str) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", "-x", script], cwd=SCRIPTS, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    ("path", "attempt", "expected"),
    [
        ("/a/b/run.out", 1, "/a/b/run-retry1.out"),
        ("/a/b/run-retry1.out", 2, "/a/b/run-retry2.out"),
        ("/a.b/run", 3, "/a.b/run-retry3"),
        ("/x y/it's $z/r-3.err", 1, "/x y/it's $z/r-3-retry1.err"),
        ("/a/a%%b.out", 1, "/a/a%%b-retry1.out"),
        ("run.tar.out", 1, "run.tar-retry1.out"),
    ],
)
def test_retry_log_names(path: str, attempt: int, expected: str) -> None:
    proc = subprocess.run(
        ["bash", "-c", 'source "$1"; rua_retry_path "$2" "$3"', "_",
         str(SCRIPTS / "recursive-unattended-accelerate.sh"), path, str(attempt)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stdout == expected + "\n"


def test_every_alignment_stage_config_takes_its_generated_overrides(monkeypatch) -> None:
    """The generator and the stage entrypoints agree: each run's overrides compose."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    for stage in submit.ALIGNMENT_STAGES:
        (run,) = submit.alignment_runs(
            stage=stage,
            prefix="exp",
            models=[Model("tiny")],
            datasets=["tiny-tasks"],
            hyperparameters={},
            partitions=2,
            artifacts_subdir="shared",
        )
        resolved = _composed(list(run.args[4:]), stage.replace("_", "-"))
        assert resolved["entrypoint"] == stage
        assert resolved["partition"]["count"] == 2
        assert resolved["output_dir"].endswith(f"shared/alignment-data/tiny-tasks/tiny/{stage}")


def test_online_template_writes_train_online_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train_online sweep template: its runs launch train_online, validated against its
    schema (a GRPO loss type it does not have is refused before anything is written)."""
    monkeypatch.setenv("DEVICES_PER_NODE", "1")
    copy = tmp_path / "online" / "1-my-experiment"
    shutil.copytree(TEMPLATES / "online/0-template", copy)
    template = _load(copy / "generate_submit.py")
    path = template.main([])
    assert "4 runs" in capsys.readouterr().out
    lines = [line for line in path.read_text().splitlines() if line.startswith("sbatch ")]
    words = shlex.split(lines[0])
    assert "post_training.train_online" in words
    assert "training_args.gradient_accumulation_steps=2" in words  # 8 prompts / (1 × 1 × 4)
    monkeypatch.setitem(template.HYPERPARAMETERS, "trainer.loss_type", ["ppo"])
    with pytest.raises(submit.SubmitError, match=r"trainer\.loss_type"):
        template.main(["--dry-run"])
