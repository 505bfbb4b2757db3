"""What a person sees: progress lines, status.json, a tracker id per run, quiet saves, --help."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from post_training.utils import progress, run_status
from post_training.utils.run import RunContext, tracker_run_id

from .conftest import REPO, job_dir, run_dirs, run_entrypoint


def test_durations_and_numbers_read_like_a_person_writes_them() -> None:
    assert [progress.format_duration(s) for s in (0, 42.4, 221, 7500, float("nan"))] == [
        "0s",
        "42s",
        "3m41s",
        "2h05m",
        "?",
    ]
    assert [progress.format_number(v) for v in (0.41234, 1210.4, 0.00096, 0, 123.45)] == [
        "0.4123",
        "1,210",
        "9.6e-04",
        "0",
        "123.5",
    ]


def test_train_line_holds_step_loss_lr_grad_speed_eta_and_preference_metrics() -> None:
    metrics = {
        "loss": 0.412,
        "learning_rate": 9.6e-4,
        "grad_norm": 0.83,
        "tokens_per_second": 1210.2,
        "rewards/margins": 0.52,
        "rewards/accuracies": 0.75,
    }
    line = progress.train_line(120, 2500, metrics, eta_s=221)
    assert line == (
        "step 120/2500 (4.8%) | loss 0.412 | margin 0.52 | acc 0.75 | lr 9.6e-04 | grad 0.83 | "
        "1,210 tok/s | eta 3m41s"
    )
    assert progress.train_line(5, 10, {"loss": 1.0}, 1, interim=True).endswith("(running)")
    assert progress.eval_line(200, {"eval_loss": 0.391, "step": 200}) == (
        "eval step 200 | eval_loss 0.391"
    )


def test_item_progress_prints_rate_and_eta_then_a_closing_line(caplog) -> None:
    caplog.set_level(logging.INFO, "post_training.progress")
    bar = progress.ItemProgress("generating", 100, "prompts", enabled=True, interval_s=0.0)
    for _ in range(4):
        bar.update(25)
        time.sleep(0.001)
    bar.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(
        r"generating: 25/100 prompts \(25\.0%\) \| \S+ prompts/s \| eta \S+", lines[0]
    )
    assert re.fullmatch(r"generating: 100/100 prompts \(100\.0%\) \| .* \| done in \S+", lines[-1])
    caplog.clear()
    with progress.labelled("compute_rewards partition-00001-of-00004"):
        labelled = progress.ItemProgress("scoring rewards", 2, enabled=True, interval_s=0.0)
        labelled.update(1)
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            "compute_rewards partition-00001-of-00004: scoring rewards: 1/2 rows (50.0%) | "
        )
    )
    # A quick loop prints nothing at all (no closing line either).
    caplog.clear()
    quiet = progress.ItemProgress("tokenizing", 10, enabled=True, interval_s=60)
    quiet.update(10)
    quiet.finish()
    assert caplog.records == []


def test_train_progress_eta_from_this_launch_and_interim_lines(caplog) -> None:
    caplog.set_level(logging.INFO, "post_training.progress")
    bar = progress.TrainProgress(100, start_step=50, interval_s=0.0, bar=False)
    assert bar.eta_s(50) != bar.eta_s(50)  # nothing done yet: unknown (nan)
    time.sleep(0.02)
    assert 0 < bar.eta_s(60) < 5  # 10 steps in ~0.02 s, 40 left
    assert bar.interim_due()
    bar.train(60, {"loss": 2.0}, interim=True)
    assert caplog.records[-1].getMessage().startswith("step 60/100 (60.0%) | loss 2")
    silent = progress.TrainProgress(100, 0, enabled=False, interval_s=0.0, bar=False)
    assert not silent.interim_due()


def test_the_tied_embedding_save_warning_is_dropped(caplog) -> None:
    progress.silence_known_warnings()
    progress.silence_known_warnings()  # idempotent: one filter
    logger = logging.getLogger("accelerate.utils.other")
    assert logger.filters.count(progress._FILTER) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("[RANK 0] Removed shared tensor {'lm_head.weight'} while saving. ...")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_status_json_through_a_run_and_a_dead_pid(tmp_path: Path) -> None:
    run_status.start(tmp_path, "train_sft")
    record = json.loads((tmp_path / "status.json").read_text())
    assert record["state"] == "running" and record["pid"] == os.getpid()
    assert run_status.read(tmp_path)["state"] == "running"  # this process is alive
    run_status.update(last_step=7)
    run_status.finish(75)
    record = json.loads((tmp_path / "status.json").read_text())
    assert (record["state"], record["exit_code"], record["last_step"]) == ("stopped", 75, 7)
    assert not run_status.active()
    run_status.start(tmp_path, "train_sft")
    run_status.finish(2, "dataset.train: data.jsonl:3: invalid JSON")
    assert run_status.read(tmp_path)["state"] == "failed"
    # A run killed outright keeps "running" in its file: read() sees its pid is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    record = {**record, "state": "running", "pid": int(dead), "exit_code": None}
    (tmp_path / "status.json").write_text(json.dumps(record))
    assert run_status.read(tmp_path)["state"] == "died"


def _run_context(run_dir: Path, checkpoint_dir: Path, resume: bool) -> RunContext:
    config = {"resuming": {"resume": resume}}
    return RunContext(run_dir, checkpoint_dir, config, "abc123", None)


def test_a_new_run_gets_a_new_tracker_id_a_resumed_one_keeps_its_own(tmp_path: Path) -> None:
    one = _run_context(tmp_path / "runs/2026-12-02_08-00-00", tmp_path / "a", resume=False)
    two = _run_context(tmp_path / "runs/2026-12-02_09-00-00", tmp_path / "b", resume=False)
    assert tracker_run_id(one, "dev") != tracker_run_id(two, "dev")
    assert tracker_run_id(one, "dev") == "dev-abc123-2026-12-02_08-00-00"
    shared = tmp_path / "checkpoints/abc123"
    shared.mkdir(parents=True)
    first = _run_context(tmp_path / "runs/2026-12-02_10-00-00", shared, resume=True)
    again = _run_context(tmp_path / "runs/2026-12-02_11-00-00", shared, resume=True)
    assert tracker_run_id(first, "dev") == tracker_run_id(again, "dev")
    assert tracker_run_id(again, "dev") == "dev-abc123-2026-12-02_10-00-00"


def test_a_short_run_prints_progress_writes_status_and_report_and_no_save_warning(
    artifacts: Path,
) -> None:
    """20 steps of the smoke preset: progress lines at each logging step with the loss falling,
    eval lines, no tied-embedding warning at the two saves, no library bars in a log; its
    status.json says completed at step 20; its report.html exists; wandb's offline run id is
    this run's own (the run dir's name in it)."""
    args = ["preset=smoke", "wandb.mode=offline", "tensorboard=false", "job_subdir=smoke"]
    proc = run_entrypoint("train_sft", args, artifacts)
    console = proc.stdout + proc.stderr
    steps = re.findall(r"\[post_training\.progress\]\[INFO\] - (step \d+/20 .*)", console)
    steps = [s for s in steps if not s.endswith("(running)")]  # a slow machine's interim lines
    assert [s.split()[1] for s in steps] == ["5/20", "10/20", "15/20", "20/20"]
    losses = [float(re.search(r"\| loss ([\d.]+)", s)[1]) for s in steps]
    assert losses[-1] < losses[0]
    assert len(re.findall(r"\[post_training\.progress\]\[INFO\] - eval step \d+ \|", console)) == 2
    assert "Removed shared tensor" not in console
    assert "Writing model shards" not in console
    (run_dir,) = run_dirs(artifacts, "smoke")
    log_file = (run_dir / "train_sft.log").read_text()
    assert "step 20/20 (100.0%) | loss" in log_file  # the job log has them too
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["last_step"]) == ("completed", 0, 20)
    assert "completed" in (run_dir / "report.html").read_text()  # status written before it
    assert len(list((run_dir / "report-plots").glob("*.png"))) >= 4
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(run_dir.name)


def test_a_launch_that_fails_on_its_data_is_marked_failed(artifacts: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    args = ["wandb.mode=disabled", "tensorboard=false", "job_subdir=bad",
            f"dataset.train.path={bad}", "dataset.train.keep_columns=[]"]  # fmt: skip
    proc = run_entrypoint("train_sft", args, artifacts, check=False)
    assert proc.returncode == 2
    (run_dir,) = (job_dir(artifacts, "bad") / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 2)
    assert "bad.jsonl:2: invalid JSON" in status["error"]
    assert "error: " + status["error"] == proc.stderr.strip().splitlines()[0]


def test_help_lists_only_the_trainers_an_entrypoint_takes() -> None:
    from post_training.losses.table import PREFERENCE_LOSSES, SFT_LOSSES

    for module, accepted in (("train_sft", SFT_LOSSES), ("train_preference", PREFERENCE_LOSSES)):
        out = subprocess.run(
            [sys.executable, "-m", f"post_training.{module}", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (line,) = [x for x in out.splitlines() if x.startswith("trainer: ")]
        assert set(line.removeprefix("trainer: ").split(", ")) == set(accepted)
        groups = {x.split(":")[0] for x in out.split("== Config ==")[0].splitlines() if ": " in x}
        assert "model_merging" not in groups and {"model", "dataset", "accelerate"} <= groups


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": "x', "Unterminated string starting at column 7"),
        ('{"a" 1}', "Expecting ':' delimiter at column 6"),
    ],
)
def test_json_errors_name_the_column_once(tmp_path: Path, text: str, message: str) -> None:
    from post_training.data_sft.file_formats import read_jsonl
    from post_training.errors import DataError

    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path}:1: invalid JSON ({message})"


def test_alignment_stage_and_preference_training_show_progress(artifacts: Path) -> None:
    """A stage's loop prints rows/s and ETA under its partition's name; a preference run's
    lines carry its reward margin and accuracy (lines forced every loop: interval 0)."""
    env = {"POST_TRAINING_PROGRESS_INTERVAL_S": "0"}
    stage = ["wandb.mode=disabled", "dataset.max_train_examples=6"]
    run_entrypoint("data_alignment.filter_dataset_for_model", stage, artifacts)
    args = [*stage, "generation.num_completions=2", "generation.batch_size=2"]
    proc = run_entrypoint("data_alignment.generate_ref_completions", args, artifacts, env=env)
    lines = re.findall(r"\[post_training\.progress\]\[INFO\] - (.*)", proc.stdout + proc.stderr)
    assert re.fullmatch(
        r"generate_ref_completions partition-00000-of-00001: generating: 2/6 prompts \(33\.3%\)"
        r" \| \S+ prompts/s \| eta \S+",
        lines[0],
    ), lines
    assert lines[-1].endswith(tuple(f"done in {s}s" for s in range(60)))

    quick = ["wandb.mode=disabled", "tensorboard=false", "job_subdir=pref",
             "training_args.num_train_epochs=null", "training_args.max_steps=4",
             "training_args.logging_steps=2", "evaluation.at_end=false"]  # fmt: skip
    proc = run_entrypoint("train_preference", quick, artifacts)
    steps = re.findall(r"\[post_training\.progress\]\[INFO\] - (step \d+/4 .*)", proc.stdout)
    assert [s.split()[1] for s in steps if "(running)" not in s] == ["2/4", "4/4"]
    assert all(re.search(r"\| margin \S+ \| acc \S+ \|", s) for s in steps)


def test_a_terminal_gets_a_bar_under_the_lines(capsys, caplog) -> None:
    caplog.set_level(logging.INFO, "post_training.progress")
    bar = progress.TrainProgress(10, start_step=0, interval_s=0.0, bar=True)
    with bar.shown():
        bar.step(5)
        bar.train(5, {"loss": 1.0})
    err = capsys.readouterr().err
    assert "5/10" in err and "step" in err  # tqdm's "5/10 [..., ...step/s]"
    assert bar._bar is None  # closed on leaving the block
