"""The README stays true: its figures equal the measured record, its commands run as written.

Every command of the README's ``bash`` blocks (and every ``$ command`` of its output examples)
must be listed in :data:`COMMANDS` with how it is checked, so that a new or edited command
fails here until someone decides: ``run`` (run here exactly as written, from the repo root with
the artifacts in a temp dir), ``expect`` (run as written; its stderr must be the README's next
line), ``fill`` (run with its ``<placeholders>`` filled by fixtures), ``covered`` (another test
runs it as written: that file must hold the named marker), or ``not_run`` (with the reason, and
the program's ``--help`` checked for the flags the command uses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import readme_figures

from .conftest import COLLECTED, REPO

README = REPO / "README.md"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class Check:
    how: str  # run | expect | fill | covered | not_run
    detail: str = ""  # covered: "<test file>::<marker>"; not_run: the reason; fill: fixture


COMMANDS: dict[str, Check] = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]' && "
    ".venv/bin/python -m post_training.train_sft": Check(
        "covered", "test_e2e_main_job.py::main_job_command()"
    ),
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[dev]' && "
    ".venv/bin/python -m pytest": Check("covered", "../.ci/run::<command 2>"),
    ".venv/bin/python -m post_training.evaluate model_path=<checkpoint dir> dataset=tiny-tasks": (
        Check("fill", "tiny_sft_start")
    ),
    ".venv/bin/python -m post_training.train_sft training_args.learning_rate=abc": Check("expect"),
    ".venv/bin/python -m post_training.train_sft trainer=plw "
    "trainer.plw_args.prompt_loss_weight=-0.1": Check("expect"),
    ".venv/bin/python -m post_training.data_sft.build_mixture name=mymix mixture.total=2000 "
    "'eval_split={size:100,stratify_by:source}'": Check("run"),
    ".venv/bin/python -m post_training.data_sft.build_split input.path=data/sft.jsonl "
    "eval_fraction=0.05 stratify_by=null": Check("run", "data/sft.jsonl"),
    ".venv/bin/python -m post_training.train_preference trainer=dpo "
    "model.model_name_or_path=<sft>/final-model model.init_from_config=false": Check(
        "covered", "test_e2e_alignment.py::model.init_from_config=false"
    ),
    ".venv/bin/python -m post_training.train_preference trainer=qrpo "
    "dataset.train.path=<pairs with ref_rewards>.jsonl ...": Check(
        "covered", "../reproducibility-scripts/alignment/tiny-end-to-end/run.sh::trainer=qrpo"
    ),
    ".venv/bin/python -m post_training.train_preference 'trainer.loss_type=[sigmoid,bco_pair,sft]' "
    "'trainer.loss_weights=[0.8,0.2,1.0]' trainer.ld_alpha=0.5 trainer.use_weighting=true": Check(
        "covered", "test_e2e_dpo_options.py::trainer.loss_weights=[0.8,0.2,1.0]"
    ),
    ".venv/bin/python -m post_training.train_preference trainer=cpo trainer.loss_type=alphapo "
    "trainer.alpha=0.25": Check("covered", "test_e2e_dpo_options.py::trainer.alpha=0.25"),
    ".venv/bin/python -m post_training.train_preference trainer=kto dataset.unpair=true "
    "model.model_name_or_path=<sft>/final-model model.init_from_config=false": Check(
        "covered", "test_e2e_kto.py::dataset.unpair=true"
    ),
    ".venv/bin/python -m post_training.train_reward model.model_name_or_path=<sft>/final-model "
    "model.init_from_config=false": Check("covered", "test_e2e_reward.py::model.init_from_config"),
    ".venv/bin/python -m post_training.data_alignment.compute_rewards reward.function=null "
    "reward.model.model_name_or_path=<reward run>/final-model": Check(
        "covered", "test_e2e_reward.py::reward.model.model_name_or_path="
    ),
    ".venv/bin/python -m post_training.train_online trainer=grpo "
    "model.model_name_or_path=<sft>/final-model model.init_from_config=false": Check(
        "covered", "test_e2e_online.py::model.init_from_config"
    ),
    ".venv/bin/python -m post_training.train_online trainer=rloo "
    "model.model_name_or_path=<sft>/final-model model.init_from_config=false": Check(
        "covered", "test_e2e_online.py::trainer=rloo"
    ),
    ".venv/bin/python -m post_training.train_online trainer.loss_type=dapo "
    "trainer.epsilon_high=0.28 'trainer.rewards=[{function: exact_match, weight: 1.0}, "
    "{function: tiny_task_partial, weight: 0.5}]'": Check(
        "covered", "test_e2e_online.py::trainer.epsilon_high=0.28"
    ),
    "bash reproducibility-scripts/alignment/tiny-end-to-end/run.sh": Check(
        "covered", "test_e2e_alignment.py::tiny-end-to-end/run.sh"
    ),
    ".venv/bin/python -m post_training.data_alignment.generate_ref_completions "
    "model.model_name_or_path=<sft>/final-model model.init_from_config=false "
    "generation.num_completions=8 generation.temperature=1.0 partition.index=0 "
    "partition.count=16": Check("covered", "test_alignment_stages.py::generate_ref_completions"),
    ".venv/bin/python -m post_training.merge model_merging=ties model_merging.base_model=<sft dir> "
    "'model_merging.models=[<dpo dir>,{path: <dpo seed-2 dir>, weight: 0.5}]' "
    "model_merging.model_parameters.density=0.4 job_subdir=sft-dpo": Check(
        "covered", "test_model_merging.py::model_merging=ties"
    ),
    "nice -n 10 .venv/bin/python -m benchmarks.run sft-cpu dpo-cpu "
    "--json artifacts/benchmarks/run.json": Check(
        "not_run", "~10 min; tests/test_benchmark_run.py runs it with --quick --threads 1"
    ),
    "nice -n 10 .venv/bin/python -m benchmarks.run --threads 1 --compile "
    "--json artifacts/benchmarks/run-threads1.json": Check(
        "not_run", "~15 min; tests/test_benchmark_run.py runs it with --quick --threads 1"
    ),
    ".venv/bin/python -m benchmarks.data_prep --num-examples 20000 --repeats 3 "
    "--json artifacts/benchmarks/data_prep.json": Check(
        "not_run", "minutes; tests/test_benchmark_data_prep.py runs it small"
    ),
    "cp -r reproducibility-scripts/sft/0-template reproducibility-scripts/sft/1-my-sweep": Check(
        "covered", "test_submit.py::sft/0-template"
    ),
    ".venv/bin/python -m post_training.report <run dir>": Check(
        "covered", "test_report.py::post_training.report"
    ),
    ".venv/bin/python -m post_training.report <run dir A> <run dir B> --out <dir> "
    "--labels base,new": Check("covered", "test_report.py::--labels"),
    "HF_HUB_OFFLINE=0 .venv/bin/python -m post_training.download model=qwen3-0.6b "
    "dataset=alpaca": Check(
        "not_run", "the network; tests/test_download.py runs it on a local Hub cache and dry"
    ),
    ".venv/bin/python -m post_training.train_sft model=qwen3-0.6b dataset=alpaca": Check(
        "covered", "test_download.py::train_sft"
    ),
    ".venv/bin/python -m post_training.evaluate model_path=<dir> "
    "harness.tasks=[tiny_tasks,gsm8k,mmlu] harness.limit=200": Check(
        "covered", "test_harness.py::harness.tasks=[tiny_tasks]"
    ),
    ".venv/bin/python -m post_training.train_sft evaluation.harness_every=200 "
    "evaluation.harness_tasks=[tiny_tasks] evaluation.harness_limit=100": Check(
        "covered", "test_harness.py::evaluation.harness_every="
    ),
    "$EDITOR reproducibility-scripts/sft/1-my-sweep/generate_submit.py": Check(
        "not_run", "a person edits the file"
    ),
    ".venv/bin/python reproducibility-scripts/sft/1-my-sweep/generate_submit.py": Check(
        "covered", "test_submit.py::generate_submit.py"
    ),
    "bash reproducibility-scripts/sft/1-my-sweep/<PREFIX>-<YYYY-MM-DD-HH-MM>/submit.sh": Check(
        "covered", "test_slurm.py::submit.sh"
    ),
    ".venv/bin/accelerate launch --config_file src/post_training/configs/accelerate/ds-zero2.yaml "
    "-m post_training.train_sft model=llama-3.2-1b-instruct dataset=my-data accelerate=ds-zero2 "
    "training_args.mixed_precision=bf16 training_args.per_device_train_batch_size=8 "
    "training_args.gradient_accumulation_steps=4 training_args.learning_rate=1e-5 "
    "job_subdir=llama1b-mydata resuming.resume=true": Check(
        "not_run", "4 GPUs, a real model and the user's dataset"
    ),
}


def readme_commands(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, command, expected output line)`` of every command in a ``bash`` block (comments
    and ``\\`` continuations joined) and every ``$ command`` of a plain block."""
    found: list[tuple[int, str, str | None]] = []
    lines = text.splitlines()
    block: str | None = None
    pending = ""
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block == "bash":
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            stripped = f"{pending} {stripped}".strip() if pending else stripped
            if stripped.endswith("\\"):
                pending = stripped[:-1].rstrip()
                continue
            pending = ""
            command = re.sub(r"\s+#\s.*$", "", stripped)  # a trailing comment
            found.append((n, command, None))
        elif block == "" and line.startswith("$ "):
            found.append((n, line[2:], lines[n] if n < len(lines) else None))
    return found


def inline_commands(text: str) -> list[str]:
    """Inline code spans that call a program (``.venv/bin/python -m ...``, ``bash x.sh``; a
    two-word mention such as ``accelerate launch`` in prose is not a command)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", text)
    pattern = r"(\.venv/bin/\w+|python3?|pip|bash|accelerate) "
    return [s for s in spans if re.match(pattern, s) and len(s.split()) >= 3]


def _run(
    command: str, cwd: Path, artifacts: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "POST_TRAINING_ARTIFACTS_DIR": str(artifacts), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


needs_venv = pytest.mark.skipif(
    not VENV_PYTHON.exists(), reason="the README's commands call .venv/bin/python; no .venv here"
)

# ------------------------------------------------------------------------------ the figures


def test_every_marked_figure_equals_the_record() -> None:
    assert readme_figures.mismatches(README.read_text(), readme_figures.read_record()) == []
    keys = readme_figures.readme_figures(README.read_text())
    for key in ("main_job_accuracy", "main_job_time", "main_job_peak_gb", "tests_collected"):
        assert key in keys, f"the README no longer marks {key}"


def test_the_recorded_test_count_is_current() -> None:
    """Within 5% (or 15 tests) of what this session collected, when it collected the suite."""
    if not COLLECTED.get("whole_suite"):
        pytest.skip("this session did not collect the whole suite (a file or -k was chosen)")
    recorded = readme_figures.read_record()["tests_collected"]["value"]
    collected = COLLECTED["count"]
    assert abs(collected - recorded) <= max(15, 0.05 * recorded), (
        f"README says {recorded} tests, {collected} are collected: run "
        "`.venv/bin/python -m benchmarks.readme_figures tests`"
    )


def test_the_figures_script_writes_and_checks(tmp_path: Path, monkeypatch) -> None:
    """``write`` puts the record into the markers; ``check`` fails on a hand-edited figure."""
    readme = tmp_path / "README.md"
    readme.write_text(
        "a <!-- fig:main_job_accuracy -->0.1<!-- /fig --> b <!-- fig:ci_time -->1 s<!-- /fig -->"
    )
    record = tmp_path / "readme_figures.json"
    record.write_text(
        json.dumps({"main_job_accuracy": {"value": 0.66666}, "ci_time": {"value": 2130}})
    )
    monkeypatch.setattr(readme_figures, "README", readme)
    monkeypatch.setattr(readme_figures, "RECORD", record)
    assert readme_figures.main(["check"]) == 1
    assert readme_figures.main(["write"]) == 0
    assert readme.read_text() == (
        "a <!-- fig:main_job_accuracy -->0.667<!-- /fig --> b "
        "<!-- fig:ci_time -->35 min 30 s<!-- /fig -->"
    )
    assert readme_figures.main(["check"]) == 0
    log = (
        "...\n==== 868 passed, 3 skipped, 1 xfailed in 1941.20s (0:32:21) ====\n"
        "CI finished in 2130s\n"
    )
    figures = readme_figures.ci_figures(log)
    assert figures["ci_outcome"] == "868 passed, 3 skipped, 1 xfailed"
    assert figures["ci_pytest_time"] == 1941.2 and figures["ci_time"] == 2130


# ------------------------------------------------------------------------------ the commands


def test_every_readme_command_is_accounted_for() -> None:
    """Each command of the README is in COMMANDS (a new one must say how it is checked), and
    each entry is still in the README."""
    written = {command for _, command, _ in readme_commands(README.read_text())}
    assert sorted(written - set(COMMANDS)) == [], "README commands without a check in COMMANDS"
    assert sorted(set(COMMANDS) - written) == [], "COMMANDS entries no longer in the README"


def program_words(command: str) -> list[str]:
    """The program each part of a shell line starts (``a && b | c``; ``nice -n N``, ``env`` and
    ``X=Y`` prefixes skipped)."""
    words = []
    for part in re.split(r"&&|\|\||;|\|", command):
        tokens = part.split()
        while tokens and (re.match(r"^[A-Z_]+=", tokens[0]) or tokens[0] in {"env", "time"}):
            tokens.pop(0)
        if tokens[:1] == ["nice"]:
            tokens = tokens[3:] if tokens[1:2] == ["-n"] else tokens[1:]
        if tokens:
            words.append(" ".join(tokens[:3]))
    return words


def test_no_command_calls_a_python_that_is_not_the_venv() -> None:
    """Plain ``python``/``pip``/``accelerate`` only exist once the venv is activated."""
    text = README.read_text()
    commands = [c for _, c, _ in readme_commands(text)] + inline_commands(text)
    bare = [
        (c, w)
        for c in commands
        for w in program_words(c)
        if w.split()[0] in {"python", "python3", "pip", "accelerate", "pytest"}
        and w != "python3 -m venv"
    ]
    assert bare == []
    assert program_words("nice -n 10 .venv/bin/python -m x && pip install y") == [
        ".venv/bin/python -m x",
        "pip install y",
    ]


def test_covered_commands_are_run_by_the_named_test() -> None:
    for command, check in COMMANDS.items():
        if check.how != "covered":
            continue
        file, marker = check.detail.split("::")
        source = (REPO / "tests" / file).resolve().read_text()
        if marker == "<command 2>":
            assert command in source, f"{file} does not run command 2 verbatim"
        else:
            assert marker in source, f"{file} no longer mentions {marker!r}"


def test_command_1_main_job_is_what_the_main_job_test_runs() -> None:
    assert readme_figures.main_job_command() == ".venv/bin/python -m post_training.train_sft"


@needs_venv
@pytest.mark.parametrize(
    "command", [c for c, check in COMMANDS.items() if check.how == "expect"], ids=lambda c: c[-40:]
)
def test_error_examples_print_what_the_readme_shows(command: str, tmp_path: Path) -> None:
    (expected,) = [out for _, c, out in readme_commands(README.read_text()) if c == command]
    proc = _run(command, REPO, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == expected
    (launch,) = tmp_path.glob("private/outputs/train_sft/dev/runs/*")  # Hydra's dir: its log
    assert not (launch / "config.yaml").exists(), "a refused config wrote a run"
    status = json.loads((launch / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 2)
    assert "error: " + status["error"] == expected


@needs_venv
def test_data_commands_run_as_written(tmp_path: Path) -> None:
    """The mixture and split builders, as written: the split's ``data/sft.jsonl`` is a user's
    file, so that command runs in a directory that has one (the venv linked in)."""
    artifacts = tmp_path / "artifacts"
    (command,) = [c for c, k in COMMANDS.items() if k.how == "run" and not k.detail]
    proc = _run(command, REPO, artifacts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (artifacts / "private/datasets/mymix/manifest.json").is_file()

    (command,) = [c for c, k in COMMANDS.items() if k.how == "run" and k.detail]
    workdir = tmp_path / "user"
    (workdir / "data").mkdir(parents=True)
    (workdir / ".venv").symlink_to(REPO / ".venv")
    source = REPO / "src/post_training/assets/tiny-tasks"
    rows = next(p for p in sorted(source.rglob("*.jsonl")) if "train" in p.name)
    with rows.open() as f, (workdir / "data/sft.jsonl").open("w") as out:
        for _, line in zip(range(400), f, strict=False):
            out.write(line)
    proc = _run(command, workdir, artifacts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = list((artifacts / "private/datasets").glob("*/manifest.json"))
    assert len(manifests) == 2


@needs_venv
def test_the_composed_config_command_runs(tmp_path: Path) -> None:
    proc = _run(
        ".venv/bin/python -m post_training.train_sft --cfg job model=qwen3-8b", REPO, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "Qwen/Qwen3-8B" in proc.stdout


@needs_venv
def test_not_run_commands_use_flags_their_program_knows(tmp_path: Path) -> None:
    for command, check in COMMANDS.items():
        if check.how != "not_run" or not command.startswith(("nice", ".venv/bin/python -m bench")):
            continue
        module = re.search(r"-m (\S+)", command)[1]
        proc = _run(f".venv/bin/python -m {module} --help", REPO, tmp_path)
        assert proc.returncode == 0, proc.stderr
        for flag in re.findall(r"\s(--[a-z-]+)", command):
            assert flag in proc.stdout, f"{module} --help does not know {flag}"


@needs_venv
@pytest.mark.e2e
def test_evaluate_command_runs_on_a_checkpoint(tiny_sft_start: Path, tmp_path: Path) -> None:
    command = next(c for c, k in COMMANDS.items() if k.how == "fill")
    model = tmp_path / "model"
    shutil.copytree(tiny_sft_start, model)
    (model / "eval-tiny-tasks.json").unlink(missing_ok=True)
    proc = _run(command.replace("<checkpoint dir>", str(model)), REPO, tmp_path / "artifacts")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Exact-match accuracy" in proc.stdout
    assert json.loads((model / "eval-tiny-tasks.json").read_text())["num_examples"] == 400


def test_readme_links_stay_inside_the_repository() -> None:
    targets = re.findall(r"\]\((?!https?://|#)([^)]+)\)", README.read_text())
    for target in targets:
        path = (REPO / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO) and path.exists(), f"README links {target}"
