"""The training benchmark (``benchmarks/run.py``) and the GPU check script.

- A smoke run: one CPU scenario at tiny sizes with ``--threads 1``, ours, the plain loss and
  TRL each once in their own process; the GPU scenarios skip on a CPU machine. Speed is never
  asserted, only that every reported field is there and sane, and that the thread count
  reached the workers.
- The selection rules on hand-made window records: best of N and the median, contended
  windows, ratios from uncontended windows only where every arm has some, and an MFU above
  100% refused (reported as inconsistent, never as a number).
- ``benchmarks/gpu_check.sh``: shellcheck-clean, and on a machine without a GPU it says so
  and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import run as bench

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench-run")
    out = root / "bench.json"
    argv = ["sft-cpu", "sft-gpu", "dpo-gpu", "--quick", "--threads", "1", "--json", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POST_TRAINING_ARTIFACTS_DIR", str(root / "artifacts"))  # tokenizer cache
        returned = bench.main(argv)
    report = json.loads(out.read_text())
    assert report["command"] == returned["command"]
    return report


def test_cpu_scenario_fields(report: dict) -> None:
    assert report["command"].startswith("python -m benchmarks.run sft-cpu sft-gpu dpo-gpu --quick")
    assert report["complete"] is True
    result = report["scenarios"]["sft-cpu"]
    assert result["settings"]["precision"] == "fp32"
    assert result["peak_flops"] > 0
    (measurement,) = result["peak_measurements"]  # one round: one peak measurement before it
    assert measurement["source"] == "measured" and measurement["flops"] > 0
    assert result["peak_flops"] >= measurement["flops"]
    assert result["contended"]["windows"] == 3 and result["contended"]["peak_measurements"] == 1
    (row,) = result["rows"]
    assert row["variant"] == "packed"
    assert row["ratio_basis"] in ("uncontended", "all")
    assert "windows" in row["ratio_from"]
    for impl in ("ours", "plain", "trl"):
        r = row[impl]
        assert len(r["runs"]) == r["windows"] == 1
        assert r["contended_windows"] == int(r["runs"][0]["contended"])
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["tokens_per_s"] == r["best"]["tokens_per_s"] == r["median"]["tokens_per_s"]
        assert 0 <= r["step_memory_gb"] < r["peak_memory_gb"]
        assert 0 < r["mfu"] <= 1 and r["mfu_note"] is None
        (run,) = r["runs"]
        assert run["timed_steps"] == 2 and len(run["step_times_s"]) == 2
    # Identical work: the same packed token count per step (both pack the same documents
    # into rows of max_length, best fit decreasing) within a few tokens.
    assert row["ours"]["tokens_per_step"] == pytest.approx(row["trl"]["tokens_per_step"], rel=0.1)
    # The plain-loss arm is our loop on the same packed rows: exactly the same tokens.
    assert row["plain"]["tokens_per_step"] == row["ours"]["tokens_per_step"]
    keys = {"tokens_per_s", "tokens_per_cpu_s", "examples_per_s", "peak_memory", "step_memory"}
    for name in ("ratio", "ratio_median", "ratio_plain", "ratio_plain_median"):
        assert set(row[name]) == keys | {"mfu"}, name
    assert set(result["targets"]) == {
        "mfu >= 60%",
        "tokens/s >= 10x TRL",
        "tokens/s > TRL",
        "peak memory <= TRL",
        "peak memory <= 0.75x plain loss",
    }


def test_threads_reach_the_workers(report: dict) -> None:
    result = report["scenarios"]["sft-cpu"]
    assert report["threads"] == result["settings"]["threads"] == 1
    assert result["peak_measurements"][0]["threads"] == 1
    for impl in ("ours", "plain", "trl"):
        (run,) = result["rows"][0][impl]["runs"]
        # what torch reported inside the worker during the steps, and the worker's environment
        assert run["torch_threads"] == run["threads_requested"] == run["threads"] == 1
        assert run["omp_num_threads"] == "1"
        # one thread cannot use more than one CPU second per wall second (a little slack for
        # the process's other threads: the Python runtime, the allocator)
        assert 0 < run["cpu_utilisation"] < 1.3


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU scenarios run on a GPU machine")
def test_gpu_scenarios_skip_with_a_reason(report: dict) -> None:
    for name in ("sft-gpu", "dpo-gpu"):
        assert "torch.cuda.is_available() is False" in report["scenarios"][name]["skipped"]


def test_unknown_scenario_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["sft-tpu"])
    assert "unknown scenario" in capsys.readouterr().err


def test_threads_default_to_every_usable_core_and_must_be_positive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = bench.build_parser()
    assert parser.parse_args([]).threads == len(os.sched_getaffinity(0))
    assert parser.parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])
    assert "--threads" in capsys.readouterr().err


def test_pairs_fit_the_max_length(tmp_path: Path) -> None:
    from benchmarks.data_prep import build_tokenizer

    tokenizer = build_tokenizer(str(tmp_path))
    stats = bench.write_pairs(tmp_path / "pairs.jsonl", 12, 160, tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert stats["pairs"] == len(rows) == 12
    for row in rows:
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
        assert row["chosen"] != row["rejected"]


# ------------------------------------------------------------ selection on hand-made windows
PEAK = 100e9  # FLOP/s


def window(tokens_per_s: float, contended: bool = False, **fields: Any) -> dict[str, Any]:
    """A window record as a worker returns it (plus ``contended``, as the parent adds it):
    1,000 tokens per step, 10 GFLOP per 1,000 tokens."""
    record = {
        "tokens_per_s": tokens_per_s,
        "examples_per_s": tokens_per_s / 500,
        "tflops": tokens_per_s * 1e7 / 1e12,
        "tokens_per_cpu_s": tokens_per_s / 2,
        "timed_s": 4000 / tokens_per_s,
        "cpu_utilisation": 1.5 if contended else 2.0,
        "peak_memory_gb": 1.0,
        "step_memory_gb": 0.5,
        "tokens_per_step": 1000.0,
        "contended": contended,
    }
    return {**record, **fields}


def test_best_of_n_is_the_fastest_window_with_the_median_beside_it() -> None:
    windows = [
        window(200, peak_memory_gb=1.2, repeat=0),
        window(500, peak_memory_gb=1.0, repeat=1),  # the fastest: shortest time, same work
        window(300, peak_memory_gb=1.1, repeat=2),
        window(100, peak_memory_gb=1.3, repeat=3),
        window(400, peak_memory_gb=1.4, repeat=4),
    ]
    arm = bench.arm_summary(windows, PEAK, "all")
    assert arm["tokens_per_s"] == arm["best"]["tokens_per_s"] == 500
    assert arm["best"]["repeat"] == 1
    assert arm["timed_s"] == min(w["timed_s"] for w in windows) == 8.0
    assert arm["median"]["tokens_per_s"] == 300
    assert arm["median"]["timed_s"] == pytest.approx(4000 / 300)
    # the best window's MFU, and the median's: 500 tokens/s × 1e7 FLOP = 5 GFLOP/s of 100
    assert arm["mfu"] == pytest.approx(0.05) and arm["median"]["mfu"] == pytest.approx(0.03)
    # memory is not slowed by other processes: the median, not the fastest window's
    assert arm["peak_memory_gb"] == arm["median"]["peak_memory_gb"] == 1.2
    assert (arm["windows"], arm["windows_used"], arm["contended_windows"]) == (5, 5, 0)
    assert arm["runs"] == windows


def test_contended_windows_are_marked_below_90_percent_of_the_threads() -> None:
    assert bench.is_contended(1.79, threads=2)
    assert not bench.is_contended(1.80, threads=2)
    assert not bench.is_contended(1.99, threads=2)
    assert bench.is_contended(0.85, threads=1)
    assert not bench.is_contended(0.97, threads=1)
    # a GPU run's CPU use is the one thread feeding the device: never marked
    assert not bench.is_contended(1.0, threads=16, device="cuda")
    assert bench.contended_rule(2) == "CPU use < 90% of 2 threads"


def test_uncontended_windows_only_where_every_arm_has_some() -> None:
    # A contended window is normally slower; this one is faster so the rule shows in the figures.
    ours = [window(200), window(400, contended=True), window(150)]
    trl = [window(100), window(50, contended=True)]
    row = bench.summarise_row("packed", {"ours": ours, "trl": trl}, PEAK)
    assert row["ratio_basis"] == "uncontended"
    assert row["ours"]["tokens_per_s"] == 200 and row["trl"]["tokens_per_s"] == 100
    assert row["ours"]["median"]["tokens_per_s"] == 175  # of 200 and 150, not 400
    assert (row["ours"]["windows_used"], row["ours"]["contended_windows"]) == (2, 1)
    assert row["ratio"]["tokens_per_s"] == pytest.approx(2.0)
    assert row["ratio_median"]["tokens_per_s"] == pytest.approx(175 / 100)
    assert row["ratio_from"].startswith("uncontended windows only")
    assert "ours 2 of 3" in row["ratio_from"] and "trl 1 of 2" in row["ratio_from"]

    # TRL has no uncontended window: both arms from all their windows, and the row says so
    trl = [window(100, contended=True), window(80, contended=True)]
    row = bench.summarise_row("packed", {"ours": ours, "trl": trl}, PEAK)
    assert row["ratio_basis"] == "all"
    assert row["ours"]["tokens_per_s"] == 400 and row["trl"]["tokens_per_s"] == 100
    assert row["ratio"]["tokens_per_s"] == pytest.approx(4.0)
    assert row["ratio_from"].startswith("all windows, contended ones included")
    assert "no uncontended window for trl" in row["ratio_from"]

    with pytest.raises(ValueError, match="no uncontended window"):
        bench.arm_summary(trl, PEAK, "uncontended")


def test_an_mfu_above_100_percent_is_reported_as_inconsistent() -> None:
    assert bench.mfu_of(0.05, PEAK) == (pytest.approx(0.5), None)
    assert bench.mfu_of(0.1, PEAK) == (pytest.approx(1.0), None)
    mfu, note = bench.mfu_of(0.146, PEAK)  # the 146% once printed
    assert mfu is None
    assert note.startswith("MFU inconsistent: measured throughput exceeds the measured peak")

    # ours beats the peak (12 GFLOP/s of 10), TRL does not: no MFU and no MFU ratio for ours,
    # and the printed table shows no percentage above 100 but the inconsistency
    peak = 10e9
    arms = {"ours": [window(1200), window(900)], "plain": [window(700)], "trl": [window(400)]}
    row = bench.summarise_row("packed", arms, peak)
    assert row["ours"]["mfu"] is None and row["ours"]["best"]["mfu"] is None
    assert row["ours"]["median"]["mfu"] is None  # 10.5 GFLOP/s: above the peak too
    assert row["ours"]["mfu_note"].startswith(bench.MFU_INCONSISTENT)
    assert row["trl"]["mfu"] == pytest.approx(0.4)
    assert row["ratio"]["mfu"] is None and row["ratio"]["tokens_per_s"] == pytest.approx(3.0)

    scenario = bench.quick(bench.DEFAULTS["sft-cpu"])
    result = {
        "scenario": asdict(scenario),
        "settings": {"threads": 2, "repeats": 2},
        "peak_flops": peak,
        "contended": {
            "rule": bench.contended_rule(2),
            "windows": 4,
            "contended_windows": 0,
            "peak_measurements": 2,
            "contended_peak_measurements": 0,
        },
        "load_avg_1_5_15": [[0.0] * 3, [0.0] * 3],
        "rows": [row],
        "targets": bench.targets(scenario, [row]),
    }
    assert result["targets"]["mfu >= 60%"] is False
    text = bench.format_training(result)
    assert "packed ours: MFU inconsistent: measured throughput exceeds the measured peak" in text
    percentages = [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", text)]
    assert percentages and max(percentages) <= 100
    assert "0 of 4 timed windows" in text


def test_peak_measurement_at_the_arms_thread_count() -> None:
    before = torch.get_num_threads()
    measurement = bench.measure_peak("cpu", 1, (256, 384), 2)
    assert torch.get_num_threads() == before  # restored for the rest of the process
    assert measurement["source"] == "measured" and measurement["threads"] == 1
    assert measurement["flops"] > 0 and 0 < measurement["cpu_utilisation"] < 1.5
    assert measurement["contended"] == bench.is_contended(measurement["cpu_utilisation"], 1)
    windows = [{"peak_flops": 2 * measurement["flops"]}]  # a worker's start-up measurement
    assert bench.scenario_peak("cpu", [measurement], windows) == 2 * measurement["flops"]


# ------------------------------------------------------------------------ benchmarks/gpu_check.sh
def test_gpu_check_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(GPU_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.access(GPU_CHECK, os.X_OK)


def gpu_check(tmp_path: Path, nvidia_smi: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GPU_CHECK_NVIDIA_SMI": nvidia_smi,
        "GPU_CHECK_OUT": str(tmp_path / "out"),
    }
    return subprocess.run(
        ["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, timeout=120
    )


def test_gpu_check_without_nvidia_smi_says_so_and_exits_0(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path, str(tmp_path / "no-nvidia-smi-here"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (
        "gpu_check: no GPU here (nvidia-smi not found); nothing to check, exiting 0"
    )
    assert not (tmp_path / "out").exists()  # nothing installed, nothing run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_check_with_nvidia_smi_but_no_cuda_torch_exits_0(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"  # answers like the real one on a card torch cannot use
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15'\n")
    fake.chmod(0o755)
    proc = gpu_check(tmp_path, str(fake))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (
        "gpu_check: no GPU here (torch.cuda.is_available() is False); nothing to check, exiting 0"
    )
    assert not (tmp_path / "out").exists()


def test_dpo_rows_compare_packed_with_unpacked_and_dpo_mfu_with_sft() -> None:
    assert bench.impls(bench.DEFAULTS["dpo-cpu"]) == ("ours", "unpacked", "trl")
    ours, unpacked, trl = [window(300)], [window(200)], [window(100)]
    row = bench.summarise_row("live", {"ours": ours, "unpacked": unpacked, "trl": trl}, PEAK)
    assert row["ratio_packed"]["examples_per_s"] == pytest.approx(1.5)
    assert row["ratio"]["examples_per_s"] == pytest.approx(3.0)
    sft = bench.summarise_row("packed", {"ours": [window(400)], "trl": trl}, PEAK)
    scenarios = {"sft-cpu": {"rows": [sft]}, "dpo-cpu": {"rows": [row]}}
    line = bench.mfu_against_sft(scenarios, "cpu")
    assert line["ratios"] == {"live": pytest.approx(0.75)}
    assert line["text"].endswith("live 0.75x (NOT met)")
    assert bench.mfu_against_sft({"dpo-cpu": {"rows": [row]}}, "cpu") is None
    text = bench.format_training(
        {
            "scenario": asdict(bench.DEFAULTS["dpo-cpu"]),
            "settings": {"threads": 1, "repeats": 1},
            "rows": [row],
            "contended": {
                "rule": "r",
                "windows": 3,
                "contended_windows": 0,
                "peak_measurements": 1,
                "contended_peak_measurements": 0,
            },
            "peak_flops": 1e10,
            "load_avg_1_5_15": [],
            "targets": {},
        }
    )
    assert "live         unpacked" in text
    assert "packed/unpacked (ours): pairs/s 1.50x" in text
