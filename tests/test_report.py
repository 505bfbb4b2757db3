"""``python -m post_training.report``: run dirs made by hand (an SFT-like and a QRPO-like one),
the CLI in a subprocess for one run and for two overlaid, and the pictures checked by their
pixels (size, number of colours, pixels of each run's line colour)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from post_training import report
from post_training.report import COLORS, MAX_POINTS, Series, read_run, write_report

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fake runs


def make_run(
    root: Path,
    job: str,
    *,
    entrypoint: str = "train_sft",
    trainer: dict[str, Any] | None = None,
    records: list[dict[str, Any]],
    status: dict[str, Any] | None = None,
    stamp: str = "2026-12-01_10-00-00-000001",
    tail: str = "",
) -> Path:
    """A run dir ``<root>/<entrypoint>/<job>/runs/<stamp>`` with ``metrics.jsonl`` (``records``,
    then the raw text ``tail``), ``config.yaml`` and, if given, ``status.json``."""
    run = root / entrypoint / job / "runs" / stamp
    run.mkdir(parents=True)
    config = {
        "entrypoint": entrypoint,
        "job_subdir": job,
        "model": {"name": "tiny", "model_name_or_path": "/assets/tiny-llama"},
        "trainer": trainer or {"name": "sft"},
        "training_args": {"max_steps": 100},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + tail)
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    return run


def _common(step: int, steps: int) -> dict[str, Any]:
    return {
        "step": step,
        "time": 1_700_000_000 + step,
        "learning_rate": 1e-3 * min(1.0, step / 10) * (1 - step / (steps + 1)),
        "grad_norm": 1.0 + 0.5 * math.sin(step / 3),
        "epoch": step / 50,
        "num_tokens": 1000 * step,
        "num_samples": 32 * step,
        "tokens_per_second": 5000 + 100 * math.cos(step),
        "perf/tflops": 0.5,
        "perf/mfu": 0.01 + 0.001 * math.sin(step),
        "peak_memory_gb": 1.0 + 0.01 * step,
    }


def sft_records(steps: int = 100, every: int = 2, eval_every: int = 20) -> list[dict[str, Any]]:
    """Training lines every ``every`` steps, eval lines every ``eval_every``, the end-of-run
    exact match at the last step."""
    out = []
    for step in range(every, steps + 1, every):
        loss = 3.0 * math.exp(-step / 30) + 0.3
        out.append(
            _common(step, steps)
            | {
                "loss": loss,
                "prompt_loss": loss * 1.5,
                "completion_loss": loss,
                "completion_perplexity": math.exp(loss),
                "token_accuracy": 1 - loss / 4,
                "completion_token_accuracy": 1 - loss / 3.5,
                "num_completion_tokens": 400,
            }
        )
        if step % eval_every == 0:
            out.append(
                {
                    "step": step,
                    "time": 1_700_000_000 + step,
                    "eval_loss": loss * 1.1,
                    "eval_completion_loss": loss * 1.1,
                    "eval_token_accuracy": 1 - loss / 3.8,
                }
            )
    out.append(
        {"step": steps, "time": 1_700_000_000 + steps, "eval_accuracy": 0.8}
        | {"eval_accuracy/add": 0.9, "eval_accuracy/copy": 0.7}
    )
    return out


def qrpo_records(steps: int = 60) -> list[dict[str, Any]]:
    out = []
    for step in range(1, steps + 1):
        t = step / steps
        out.append(
            _common(step, steps)
            | {
                "loss": 0.5 * (1 - t) + 0.05,
                "rewards/chosen": 0.4 * t,
                "rewards/rejected": -0.3 * t,
                "rewards/margins": 0.7 * t,
                "rewards/accuracies": 0.5 + 0.4 * t,
                "logps/chosen": -40 + 5 * t,
                "logps/rejected": -45 - 5 * t,
                "logits/chosen": 0.1,
                "logits/rejected": 0.2,
                "quantile_rewards/chosen": 0.7,
                "quantile_rewards/rejected": 0.3,
                "quantile_rewards/margins": 0.4,
                "beta_log_z": -0.2,
                "beta_log_z/chosen": -0.2,
                "beta_log_z/rejected": -0.2,
                "targets/chosen": 0.9 - 0.1 * t,
                "targets/rejected": 0.5 - 0.1 * t,
                "beta/chosen": 0.1,
                "beta/rejected": 0.1,
                "loss/chosen": 0.3 * (1 - t),
                "loss/rejected": 0.2 * (1 - t),
                "beta_capped_fraction": 0.0,
                "quantile_clamped_fraction": 0.0,
            }
        )
        if step % 20 == 0:
            out.append({"step": step, "eval_loss": 0.6 * (1 - t) + 0.1, "eval_rewards/margins": t})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    sft = make_run(
        root,
        "sft-job",
        records=sft_records(),
        status={"state": "completed", "exit_code": 0, "started": "a", "ended": "b"},
    )
    qrpo = make_run(
        root,
        "qrpo-job",
        entrypoint="train_preference",
        trainer={"name": "qrpo", "beta": 0.1},
        records=qrpo_records(),
        stamp="2026-12-02_11-00-00-000002",
    )
    return {"sft": sft, "qrpo": qrpo, "root": root}


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "post_training.report", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=120,
    )


# --------------------------------------------------------------------------- pixels


def load_rgb(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return np.round(image[..., :3] * 255).astype(np.int16)


def color_pixels(image: np.ndarray, hex_color: str, tol: int = 12) -> int:
    """Pixels within ``tol`` (per channel) of ``hex_color``."""
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(image - rgb).max(-1) <= tol).sum())


def distinct_colors(image: np.ndarray) -> int:
    flat = image.reshape(-1, 3).astype(np.int64)
    return len(np.unique(flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]))


def assert_picture(
    path: Path, colors: list[str], min_pixels: int = 150, max_share: float = 0.2
) -> np.ndarray:
    """A real plot: big enough, anti-aliased (many colours), each run's colour drawn, and no
    run colour covering more than ``max_share`` (lines are lines, not filled areas)."""
    image = load_rgb(path)
    height, width = image.shape[:2]
    assert width >= 500 and height >= 300, (path, image.shape)
    assert distinct_colors(image) > 50, path
    white = int((image.min(-1) >= 250).sum())
    assert white > 0.5 * width * height, f"{path}: mostly not background"
    for color in colors:
        n = color_pixels(image, color)
        assert min_pixels <= n <= max_share * width * height, (path, color, n)
    return image


def bar_widths(image: np.ndarray, hex_color: str) -> list[int]:
    """Horizontal bars of ``hex_color``, top to bottom: each one's width in pixels."""
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    per_row = (np.abs(image - rgb).max(-1) <= 12).sum(1)
    widths, current = [], 0
    for count in [*per_row.tolist(), 0]:
        if count > 20:
            current = max(current, count)
        elif current:
            widths.append(current)
            current = 0
    return widths


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


# --------------------------------------------------------------------------- CLI


def test_one_run_report_in_the_run_dir(runs: dict[str, Path]) -> None:
    proc = run_cli(runs["sft"])
    assert proc.returncode == 0, proc.stderr
    page_path = runs["sft"] / "report.html"
    assert f"Report: {page_path}" in proc.stdout
    page = page_path.read_text()
    sources = img_sources(page)
    pngs = sorted((runs["sft"] / report.PLOTS_DIR).glob("*.png"))
    assert sorted(sources) == sorted(f"{report.PLOTS_DIR}/{p.name}" for p in pngs)
    names = {p.stem for p in pngs}
    assert {"loss", "learning_rate", "grad_norm", "throughput", "memory"} <= names
    assert {"training_metrics", "final_eval"} <= names
    assert not names & {"preference", "qrpo"}  # no preference keys logged
    for source in sources:
        assert not source.startswith(("/", "http")) and (page_path.parent / source).is_file()
    for png in pngs:
        if png.stem != "final_eval":
            assert_picture(png, [COLORS[0]])
    # the end-of-run accuracies, logged once: bars whose lengths are the values (x from 0)
    final = runs["sft"] / report.PLOTS_DIR / "final_eval.png"
    bars = assert_picture(final, [COLORS[0]], max_share=0.6)
    widths = bar_widths(bars, COLORS[0])
    assert len(widths) == 3, widths
    assert np.allclose(np.array(widths) / widths[1], [0.8 / 0.9, 1.0, 0.7 / 0.9], atol=0.02)
    assert color_pixels(load_rgb(final), COLORS[1]) < 20  # one run: one colour
    # the page: label, run facts, the metric table
    assert "sft-job/2026-12-01_10-00-00-000001" in page
    assert "train_sft" in page and "tiny" in page and "/assets/tiny-llama" in page
    assert "completed, exit code 0" in page
    assert "last step 100 of max_steps 100" in page
    assert '<td>eval_accuracy/add</td><td class="num">0.9</td>' in page
    assert "No metrics" not in page and "unreadable" not in page


def test_two_runs_overlaid_with_labels_and_legend(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = run_cli(runs["sft"], runs["qrpo"], "--out", out, "--labels", "baseline,quantile")
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    names = {Path(s).stem for s in img_sources(page)}
    assert {"loss", "preference", "qrpo", "final_eval", "training_metrics"} <= names
    assert "baseline" in page and "quantile" in page
    assert f"background:{COLORS[0]}" in page and f"background:{COLORS[1]}" in page
    # both runs logged these: both colours on the same axes
    for name in ("loss", "learning_rate", "grad_norm", "throughput", "memory"):
        assert_picture(out / report.PLOTS_DIR / f"{name}.png", [COLORS[0], COLORS[1]])
    # only the QRPO run logged these: its colour (the second), the first run's only in the legend
    for name in ("preference", "qrpo"):
        image = assert_picture(out / report.PLOTS_DIR / f"{name}.png", [COLORS[1]], 400)
        assert color_pixels(image, COLORS[0]) < color_pixels(image, COLORS[1]) / 5
    assert "qrpo" in page and "train_preference" in page


def test_several_runs_default_to_a_report_dir_in_the_cwd(tmp_path: Path) -> None:
    one = make_run(tmp_path, "a", records=[{"step": 1, "loss": 2.0}], stamp="t1")
    two = make_run(tmp_path, "b", records=[{"step": 1, "loss": 1.0}], stamp="t2")
    proc = run_cli(one, two, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = tmp_path.glob("report-*")
    page = (out / "report.html").read_text()
    assert "a/t1" in page and "b/t2" in page
    assert img_sources(page) == [f"{report.PLOTS_DIR}/loss.png"]


def test_bad_paths_are_one_line_and_exit_2(runs: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([tmp_path / "absent"], "no such directory"),
        ([empty], "not a run dir (no metrics.jsonl)"),
        ([runs["sft"], empty], str(empty)),  # one bad dir among several
        ([runs["sft"].parent.parent], "it is a job dir: pass one of its runs"),
        ([runs["sft"], "--labels", "a,b"], "2 labels for 1 run dirs"),
    ]
    for args, expected in cases:
        proc = run_cli(*args, "--out", tmp_path / "never")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- robustness


def test_killed_run_with_blank_lines_nan_and_a_truncated_last_line(tmp_path: Path) -> None:
    records = sft_records(steps=40, eval_every=1000)[:-1]  # no eval at all
    records[5]["loss"] = "nan"
    records[6]["grad_norm"] = "inf"
    lines = "".join(json.dumps(r) + "\n" + ("\n" if i == 3 else "") for i, r in enumerate(records))
    run = tmp_path / "train_sft" / "killed" / "runs" / "t1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(lines + '{"step": 42, "loss": 0.')  # killed mid-line
    (run / "status.json").write_text("{not json")
    data = read_run(run)
    assert data.label == "killed/t1"  # no config.yaml: the job from the path
    assert data.blank_lines == 1 and data.last_line_truncated
    assert data.bad_lines == [len(records) + 2]
    assert data.series["loss"].nonfinite == 1 and data.series["grad_norm"].nonfinite == 1
    assert math.isfinite(data.series["loss"].min[0])
    page = write_report([run], run).read_text()
    assert "the last line is truncated" in page and "1 blank line" in page
    assert "unreadable status.json" in page
    assert "<td>loss</td>" in page and "nan" not in page.split("<td>loss</td>")[1][:60]
    names = {Path(s).stem for s in img_sources(page)}
    assert not names & {"eval_metrics", "final_eval"} and "loss" in names
    assert_picture(run / report.PLOTS_DIR / "loss.png", [COLORS[0]])


def test_one_point_empty_file_and_only_non_numeric_values(tmp_path: Path) -> None:
    one = make_run(tmp_path, "one", records=[{"step": 1, "loss": 2.0, "learning_rate": 1e-4}])
    page = write_report([one], one).read_text()
    image = assert_picture(one / report.PLOTS_DIR / "loss.png", [COLORS[0]], min_pixels=10)
    assert image.shape[1] >= 500
    assert "last step 1" in page

    empty = make_run(tmp_path, "empty", records=[], stamp="t2")
    page = write_report([empty], empty).read_text()
    assert "No metrics logged yet" in page and "Nothing to plot" in page
    assert not list((empty / report.PLOTS_DIR).glob("*.png"))

    odd = make_run(tmp_path, "odd", records=[{"step": 3, "note": "text", "flag": True}], stamp="t")
    page = write_report([odd, one], tmp_path / "mixed").read_text()
    assert "odd/t" in page and "<td>note</td>" not in page


def test_a_report_written_again_drops_its_stale_pictures(tmp_path: Path) -> None:
    run = make_run(tmp_path, "pref", records=[{"step": 1, "quantile_rewards/margins": 0.5}])
    write_report([run], run)
    assert (run / report.PLOTS_DIR / "qrpo.png").is_file()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    page = write_report([run], run).read_text()
    assert not (run / report.PLOTS_DIR / "qrpo.png").exists()
    assert img_sources(page) == [f"{report.PLOTS_DIR}/loss.png"]


def test_huge_file_is_streamed_and_thinned(tmp_path: Path) -> None:
    run = tmp_path / "huge"
    run.mkdir()
    n = 25_000
    with (run / "metrics.jsonl").open("w") as handle:
        for step in range(1, n + 1):
            handle.write(f'{{"step": {step}, "loss": {1 + 1 / step}, "grad_norm": 0.5}}\n')
    start = time.perf_counter()
    data = read_run(run)
    series = data.series["loss"]
    steps, values = series.points()
    assert series.count == n and len(steps) <= MAX_POINTS
    assert len(steps) > MAX_POINTS // 2
    assert steps[0] == 1 and steps[-1] == n and values[-1] == 1 + 1 / n
    assert series.min == (1 + 1 / n, n) and series.max == (2.0, 1)
    assert steps == sorted(steps)
    page = write_report([run], run).read_text()
    assert "thinned to at most" in page
    assert time.perf_counter() - start < 15


def test_series_thinning_keeps_every_kth_point_and_the_last() -> None:
    series = Series()
    for i in range(10 * MAX_POINTS + 7):
        series.add(float(i), float(i))
    steps, _ = series.points()
    assert len(steps) <= MAX_POINTS
    assert steps[-1] == 10 * MAX_POINTS + 6
    stride = series.stride
    assert all(s % stride == 0 for s in steps[:-1])


def test_write_report_is_fast_and_import_light(runs: dict[str, Path], tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; t = time.perf_counter();"
        "from post_training.report import write_report;"
        "light = not any(m in sys.modules for m in ('torch', 'matplotlib', 'transformers'));"
        f"write_report([Path({str(runs['sft'])!r})], Path({str(tmp_path / 'r')!r}));"
        "print(light, time.perf_counter() - t, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    light, seconds, torch_loaded = proc.stdout.split()
    assert light == "True" and torch_loaded == "False"
    assert float(seconds) < 12, seconds  # ~2 s on a quiet core (budget 3 s); loose for busy CI


def test_html_screenshot_in_headless_chromium(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium / chromium-browser on PATH: the page is not rendered")
    one = make_run(tmp_path, "a", records=sft_records(20, eval_every=10), stamp="t1")
    two = make_run(tmp_path, "b", records=[{"step": s, "loss": 2 / s} for s in range(1, 21)])
    page = write_report([one, two], tmp_path / "page")
    shot = tmp_path / "shot.png"
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # as root
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1300,1800",
        page.as_uri(),
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{browser} did not finish a headless screenshot in 90 s")
    if not shot.is_file():
        pytest.skip(f"{browser} cannot run headless here (exit {proc.returncode})")
    image = load_rgb(shot)
    assert image.shape[:2] == (1800, 1300)
    assert distinct_colors(image) > 100
    white = int((image.min(-1) >= 250).sum())
    assert white < 0.97 * image.shape[0] * image.shape[1]  # not a blank page
    # the swatches and the figures are drawn: both run colours on the page
    assert color_pixels(image, COLORS[0], 20) > 300 and color_pixels(image, COLORS[1], 20) > 300


def test_a_run_killed_outright_shows_as_died(tmp_path: Path) -> None:
    """status.json still says running, but its pid is gone on this host: the report says died."""
    import socket
    import subprocess
    import sys

    from post_training.report import write_report

    run = tmp_path / "job" / "runs" / "2026-12-02_08-00-00"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    status = {"state": "running", "pid": int(gone), "host": socket.gethostname(), "last_step": 2}
    (run / "status.json").write_text(json.dumps(status))
    html = write_report([run], tmp_path / "out").read_text()
    assert "died" in html
