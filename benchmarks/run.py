"""Training throughput, MFU and peak memory of our trainers against TRL 1.x on identical work.

    python -m benchmarks.run [SCENARIO ...] [--steps N] [--warmup W] [--repeats R] [--quick]
                             [--threads T] [--json OUT]

Scenarios (default: all of them; the GPU ones skip, saying why, without CUDA):

- ``sft-cpu``: SFT with packing (best-fit decreasing, 1024-token rows; TRL: ``packing=True,
  packing_strategy="bfd"``, padding-free, ``assistant_only_loss=True``), fp32, SDPA, a 32k
  vocabulary. A third arm, ``plain``, is our loop with the plain Hugging Face loss
  (``model(..., labels=...).loss`` on full-vocabulary logits) in place of our chunked one: the
  memory the chunked LM head saves.
- ``dpo-cpu``: sigmoid DPO (beta 0.1), two sub-rows: a live reference model, and reference
  log-probs precomputed before training (ours: ``reference.precompute=true``; TRL:
  ``precompute_ref_log_probs=True``). Ours packs several pairs per row
  (``training_args.packing=true``); a third arm, ``unpacked``, is ours with one pair per row.
- ``data-prep``: SFT data preparation (tokenize + mask + pack), :mod:`benchmarks.data_prep`.
- ``sft-gpu`` / ``dpo-gpu``: the same on a ~1B Llama (random init), bf16, flash-attention
  varlen when ``flash_attn`` is installed (else SDPA), 4096-token packed rows, our chunked loss.

Both implementations get the same model config (random init from seed 0), the same data (a
fixed synthetic chat set with log-normal, long-tailed lengths, from ``benchmarks.data_prep``),
tokenizer, chat format (chatml; only assistant replies are trained), batch, max length,
precision, optimizer settings (AdamW, constant lr, no warm-up, clip 1.0, no gradient
checkpointing) and number of steps. Every measured run is a fresh process
(:mod:`benchmarks.train_worker`, whose docstring says exactly what is timed) with the same
thread count (``--threads``, default every core this process may run on: the worker's
``torch.set_num_threads`` and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``).

How the figures are made robust to a shared machine (other processes can only slow a run
down, so the fastest repeat is the estimate, as ``timeit`` takes it):

- The arms are interleaved: each of ``--repeats`` rounds runs every arm once, after a fp32
  matmul peak measurement (CPU) in this process at the same thread count.
- Each run has one timed window (the steps after the warm-up). Its CPU use (CPU seconds per
  wall second) is recorded; a window whose CPU use is below 90% of its threads is marked
  *contended* (other processes had some of its cores). Peak measurements are marked the same
  way.
- Per arm the table shows the best window (the shortest time for the same work: highest
  tokens/s), with the median beside it. Both come from the uncontended windows when every arm
  of the row has at least one, else from all windows; the row says which (``ratio_from``), and
  the ours/TRL ratios are computed from those same windows.
- MFU (``post_training.utils.flops``: 6·N + 12·L·H·D·S FLOPs per token) is against the dense
  bf16 peak of the GPU, or on CPU against the best of all the matmul peak measurements (the
  per-round ones and each worker's at its start-up, all at the arms' thread count). An MFU
  above 100% means the measured peak is not the machine's peak; it is never reported as a
  number: the field is ``null`` and ``mfu_note`` says "MFU inconsistent: measured throughput
  exceeds the measured peak".

``--threads 1`` gives a figure that other processes on a 2-core machine hardly move; report it
beside the all-cores one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_SEED = 0
SCENARIOS = ("sft-cpu", "dpo-cpu", "data-prep", "sft-gpu", "dpo-gpu")

TARGETS = {
    "sft_mfu": 0.60,
    "sft_tokens_ratio": 10.0,
    "sft_memory_vs_plain": 0.75,  # "well below the plain loss" (issue 4)
    "dpo_pairs_ratio": 3.0,
    "dpo_mfu_vs_sft": 0.8,
}


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # sft | dpo
    device: str  # cpu | cuda
    model: ModelShape
    max_length: int  # SFT: packed row length; DPO: per side (prompt + reply)
    batch_size: int  # SFT: packed rows; DPO: pairs
    warmup: int
    steps: int  # timed steps, after the warm-up ones
    num_examples: int  # SFT chats generated (DPO: pairs = (warmup + steps) × batch)
    precision: str = "fp32"
    learning_rate: float = 1e-4
    loss_chunk_size: int = 1024
    vocab_size: int | None = None  # the model's (≥ the tokenizer's); None: the tokenizer's

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


CPU_MODEL = ModelShape(256, 768, 4, 4, 4)  # ~8M matmul parameters, 6M of them the LM head
GPU_MODEL = ModelShape(2048, 8192, 16, 32, 8)  # Llama-3.2-1B's body: ~1.0B with a 24k vocab
QUICK_MODEL = ModelShape(64, 128, 2, 2, 2)

DEFAULTS = {
    "sft-cpu": Scenario("sft-cpu", "sft", "cpu", CPU_MODEL, 1024, 2, 1, 4, 600, vocab_size=32768),
    "dpo-cpu": Scenario("dpo-cpu", "dpo", "cpu", CPU_MODEL, 512, 4, 1, 4, 0),
    "sft-gpu": Scenario("sft-gpu", "sft", "cuda", GPU_MODEL, 4096, 2, 3, 10, 3000, "bf16"),
    "dpo-gpu": Scenario("dpo-gpu", "dpo", "cuda", GPU_MODEL, 2048, 4, 3, 10, 0, "bf16"),
}


def quick(s: Scenario) -> Scenario:
    """Tiny sizes for a smoke run (the test suite)."""
    model = QUICK_MODEL if s.device == "cpu" else s.model
    length = 256 if s.kind == "sft" else 192
    return replace(
        s, model=model, max_length=length, warmup=1, steps=2, num_examples=60, vocab_size=None
    )


# ----------------------------------------------------------------------------------- set-up
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def model_dir(root: Path, scenario: Scenario, tokenizer_path: Path) -> Path:
    """config.json (Llama, untied) + the tokenizer: what both load, weights from seed 0."""
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from benchmarks.data_prep import EOS_TOKEN, PAD_TOKEN

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    shape = scenario.model
    vocab_size = scenario.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"{scenario.name}: vocab_size {vocab_size} < {len(tokenizer)} tokens")
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(4096, 2 * scenario.max_length),
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None,
        **asdict(shape),
    )
    target = root / f"model-{scenario.name}"
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def write_sft_data(path: Path, num_examples: int) -> dict[str, Any]:
    from benchmarks.data_prep import synthetic_conversations

    chats = synthetic_conversations(num_examples, DATA_SEED)
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return {"chats": len(chats)}


def write_pairs(path: Path, num_pairs: int, max_length: int, tokenizer_path: Path) -> dict:
    """Pairs from the synthetic chats: the prompt is a chat up to its last reply, chosen that
    reply, rejected the last reply of another chat. Pairs whose either side (prompt + reply,
    chatml) exceeds ``max_length`` tokens are skipped, so neither implementation truncates."""
    from transformers import PreTrainedTokenizerFast

    from benchmarks.data_prep import EOS_TOKEN, synthetic_conversations
    from post_training.data_sft.templates import TEMPLATES

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    chatml = TEMPLATES["chatml"].bind(None, EOS_TOKEN)
    chats = synthetic_conversations(4 * num_pairs + 16, DATA_SEED + 1)
    rows, lengths = [], []
    for i, chat in enumerate(chats):
        other = chats[(i + 1) % len(chats)][-1]
        row = {"prompt": chat[:-1], "chosen": [chat[-1]], "rejected": [dict(other)]}
        sides = [row["prompt"] + row[s] for s in ("chosen", "rejected")]
        n = [len(tokenizer(chatml.render(m)[0], add_special_tokens=False).input_ids) for m in sides]
        if max(n) <= max_length:
            rows.append(row)
            lengths.append(sum(n))
        if len(rows) == num_pairs:
            break
    if len(rows) < num_pairs:
        raise RuntimeError(f"only {len(rows)} pairs fit in {max_length} tokens per side")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pairs": len(rows), "mean_pair_tokens": statistics.mean(lengths)}


def default_threads() -> int:
    """Every core this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_worker(
    spec: dict[str, Any], workdir: Path, name: str, artifacts: Path, threads: int
) -> dict:
    """One measured run in a fresh process pinned to ``threads`` threads."""
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    env = {
        **os.environ,
        "POST_TRAINING_ARTIFACTS_DIR": str(artifacts),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_worker", str(spec_path), str(out_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker {name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    result = json.loads(out_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------- scenarios
def skip_reason(scenario: Scenario) -> str | None:
    import torch

    if scenario.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return None


def attn_implementation(device: str) -> str:
    if device == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


# ------------------------------------------------------------------ windows, best-of-N, MFU
CONTENDED_FRACTION = 0.9  # CPU use below this fraction of the threads: contended
# What a window contributes to its arm's figures: throughput (best window; median beside it)
# and memory (median: other processes do not change it, and a single odd run should not).
THROUGHPUT_KEYS = ("tokens_per_s", "examples_per_s", "tflops", "tokens_per_cpu_s", "timed_s")
WINDOW_KEYS = (*THROUGHPUT_KEYS, "cpu_utilisation", "peak_memory_gb", "step_memory_gb")
MFU_INCONSISTENT = "MFU inconsistent: measured throughput exceeds the measured peak"


def is_contended(cpu_utilisation: float, threads: int, device: str = "cpu") -> bool:
    """True when a CPU window's CPU use (CPU s per wall s) is below 90% of its threads: other
    processes held some of its cores. GPU windows are never marked (their CPU use is the one
    thread feeding the device, whatever the thread count)."""
    return device == "cpu" and cpu_utilisation < CONTENDED_FRACTION * threads


def contended_rule(threads: int) -> str:
    return f"CPU use < {CONTENDED_FRACTION:.0%} of {threads} thread{'' if threads == 1 else 's'}"


def mfu_of(tflops: float, peak_flops: float) -> tuple[float | None, str | None]:
    """(MFU, None), or (None, why) when the throughput exceeds the peak: then the peak is not
    the machine's (measured while contended, or at another thread count) and no MFU is given."""
    mfu = tflops * 1e12 / peak_flops
    if mfu > 1.0:
        figures = f"{tflops * 1e3:,.1f} > {peak_flops / 1e9:,.1f} GFLOP/s"
        return None, f"{MFU_INCONSISTENT} ({figures})"
    return mfu, None


def fmt_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{mfu:.1%}"


def best_window(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest window: the highest tokens/s, i.e. the shortest time for the same work
    (every repeat of an arm does the same steps on the same data)."""
    return max(windows, key=lambda w: w["tokens_per_s"])


def windows_for(windows: Sequence[dict[str, Any]], basis: str) -> list[dict[str, Any]]:
    """The windows a figure is taken from: ``uncontended`` ones or ``all``."""
    if basis == "all":
        return list(windows)
    if basis == "uncontended":
        return [w for w in windows if not w["contended"]]
    raise ValueError(f"basis {basis!r}: uncontended or all")


def row_basis(arms: dict[str, Sequence[dict[str, Any]]]) -> str:
    """``uncontended`` when every arm has an uncontended window, else ``all``: both sides of
    a ratio always come from the same kind of window."""
    every = all(windows_for(ws, "uncontended") for ws in arms.values())
    return "uncontended" if every else "all"


def arm_summary(windows: Sequence[dict[str, Any]], peak: float, basis: str) -> dict[str, Any]:
    """Best-of-N and median over an arm's windows of ``basis``; the top-level fields are the
    best window's throughput and the median memory (what the table prints and ratios use)."""
    used = windows_for(windows, basis)
    if not used:
        raise ValueError(f"no {basis} window among {len(windows)}")
    best = best_window(used)
    best_fields = {k: best[k] for k in WINDOW_KEYS}
    best_fields["mfu"], best_fields["mfu_note"] = mfu_of(best["tflops"], peak)
    best_fields["repeat"] = best.get("repeat")
    median = {k: statistics.median(w[k] for w in used) for k in WINDOW_KEYS}
    median["mfu"], median["mfu_note"] = mfu_of(median["tflops"], peak)
    out = {k: best_fields[k] for k in (*THROUGHPUT_KEYS, "cpu_utilisation", "mfu", "mfu_note")}
    out["peak_memory_gb"] = median["peak_memory_gb"]
    out["step_memory_gb"] = median["step_memory_gb"]
    out["tokens_per_step"] = best["tokens_per_step"]
    out["best"] = best_fields
    out["median"] = median
    out["basis"] = basis
    out["windows"] = len(windows)
    out["windows_used"] = len(used)
    out["contended_windows"] = sum(bool(w["contended"]) for w in windows)
    out["runs"] = list(windows)
    return out


def describe_basis(basis: str, arms: dict[str, Sequence[dict[str, Any]]]) -> str:
    counts = ", ".join(
        f"{impl} {len(windows_for(ws, 'uncontended'))} of {len(ws)}" for impl, ws in arms.items()
    )
    if basis == "uncontended":
        return f"uncontended windows only ({counts} uncontended)"
    lacking = [impl for impl, ws in arms.items() if not windows_for(ws, "uncontended")]
    return (
        f"all windows, contended ones included: no uncontended window for {', '.join(lacking)} "
        f"({counts} uncontended)"
    )


def summarise_row(variant: str, arms: dict[str, list[dict[str, Any]]], peak: float) -> dict:
    """One table row: each arm's best/median over the row's basis, ours/TRL (and ours/plain)
    ratios of the best windows and of the medians."""
    basis = row_basis(arms)
    row: dict[str, Any] = {"variant": variant}
    for impl, windows in arms.items():
        row[impl] = arm_summary(windows, peak, basis)
    comparisons = {  # ratio key: (numerator arm, denominator arm)
        "ratio": ("ours", "trl"),
        "ratio_compiled": ("compiled", "ours"),  # compiled / eager, both ours
        "ratio_packed": ("ours", "unpacked"),  # several pairs per row / one, both ours
        "ratio_plain": ("ours", "plain"),
    }
    for key, (top, bottom) in comparisons.items():
        if top in row and bottom in row:
            row[key] = ratios(row[top], row[bottom])
            row[f"{key}_median"] = ratios(row[top]["median"], row[bottom]["median"])
    row["ratio_basis"] = basis
    row["ratio_from"] = describe_basis(basis, arms)
    return row


# ---------------------------------------------------------------------------- the matmul peak
def measure_peak(device: str, threads: int, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """One peak measurement: on GPU the rated dense bf16 peak (nothing to measure); on CPU the
    best of ``repeats`` timed fp32 ``n×n @ n×n`` matmuls per size at ``threads`` threads, with
    the CPU use of the timed matmuls (marked contended as a training window is)."""
    import torch

    from post_training.utils.flops import device_peak_flops

    if device == "cuda":
        return {"flops": device_peak_flops("cuda"), "source": "rated", "contended": False}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best, wall, cpu = 0.0, 0.0, 0.0
    try:
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b  # warm-up
            for _ in range(repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                a @ b
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                wall, cpu = wall + dw, cpu + dc
                best = max(best, 2 * n**3 / dw)
    finally:
        torch.set_num_threads(previous)
    return {
        "flops": best,
        "source": "measured",
        "threads": threads,
        "cpu_utilisation": cpu / wall,
        "contended": is_contended(cpu / wall, threads),
    }


def scenario_peak(device: str, measurements: list[dict], windows: list[dict]) -> float:
    """The peak MFU divides by: the GPU's rated one; on CPU the best measurement at the arms'
    thread count, the workers' start-up ones included (the highest: the most conservative)."""
    if device == "cuda":
        return measurements[0]["flops"]
    return max([m["flops"] for m in measurements] + [w["peak_flops"] for w in windows])


def run_training_scenario(
    scenario: Scenario,
    repeats: int,
    root: Path,
    threads: int,
    quick_mode: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    from benchmarks.data_prep import EOS_TOKEN, PAD_TOKEN, build_tokenizer

    tokenizer_path = build_tokenizer()
    workdir = root / scenario.name
    workdir.mkdir(parents=True, exist_ok=True)
    directory = model_dir(workdir, scenario, tokenizer_path)
    data_path = workdir / "data.jsonl"
    if scenario.kind == "sft":
        data = write_sft_data(data_path, scenario.num_examples)
        variants: list[str | None] = [None]
    else:
        pairs = scenario.total_steps * scenario.batch_size
        data = write_pairs(data_path, pairs, scenario.max_length, tokenizer_path)
        variants = ["live", "precomputed"]
    base = {
        "kind": scenario.kind,
        "model_dir": str(directory),
        "data_path": str(data_path),
        "max_length": scenario.max_length,
        "batch_size": scenario.batch_size,
        "steps": scenario.total_steps,
        "warmup": scenario.warmup,
        "precision": scenario.precision,
        "attn_implementation": attn_implementation(scenario.device),
        "learning_rate": scenario.learning_rate,
        "loss_chunk_size": scenario.loss_chunk_size,
        "vocab_size": scenario.vocab_size,
        "seed": 0,
        "special_tokens": {"eos": EOS_TOKEN, "pad": PAD_TOKEN},
    }
    sizes, peak_repeats = ((1024, 1536), 3) if quick_mode else ((1024, 1536, 2048), 5)
    load_start = os.getloadavg()
    measurements: list[dict] = []
    runs: dict[tuple[str | None, str], list[dict]] = {}
    for repeat in range(repeats):
        measurement = measure_peak(scenario.device, threads, sizes, peak_repeats)
        measurements.append({**measurement, "repeat": repeat})
        if scenario.device == "cpu":
            log(
                f"{scenario.name} round {repeat}: matmul peak {measurement['flops'] / 1e9:.1f} "
                f"GFLOP/s at {threads} threads, CPU use {measurement['cpu_utilisation']:.2f}"
                + (" (contended)" if measurement["contended"] else "")
            )
        for ref in variants:
            for impl in impls(scenario, compiled):
                name = f"{impl}-{ref or 'sft'}-{repeat}"
                result = run_worker(
                    {**base, "impl": impl, "ref": ref}, workdir, name, root / "artifacts", threads
                )
                result["repeat"] = repeat
                result["threads"] = threads
                result["contended"] = is_contended(
                    result["cpu_utilisation"], threads, scenario.device
                )
                runs.setdefault((ref, impl), []).append(result)
                done = [w for ws in runs.values() for w in ws]
                peak_so_far = scenario_peak(scenario.device, measurements, done)
                mfu, note = mfu_of(result["tflops"], peak_so_far)
                log(
                    f"{scenario.name} {name}: {result['tokens_per_s']:,.0f} tokens/s, "
                    f"{result['examples_per_s']:.2f} ex/s, MFU {fmt_mfu(mfu)} (of "
                    f"{peak_so_far / 1e9:,.0f} GFLOP/s{'; ' + note if note else ''}), "
                    f"peak {result['peak_memory_gb']:.2f} GB, CPU use "
                    f"{result['cpu_utilisation']:.2f} of {result['torch_threads']} threads"
                    + (" (contended)" if result["contended"] else "")
                    + f" ({result['wall_s']:.0f} s)"
                )
    windows = [w for ws in runs.values() for w in ws]
    peak = scenario_peak(scenario.device, measurements, windows)
    for w in windows:  # each window's MFU against the scenario's peak (never above 100%)
        w["mfu"], w["mfu_note"] = mfu_of(w["tflops"], peak)
    rows = [
        summarise_row(
            ref or "packed", {impl: runs[(ref, impl)] for impl in impls(scenario, compiled)}, peak
        )
        for ref in variants
    ]
    settings = {k: v for k, v in base.items() if k not in ("model_dir", "data_path")}
    return {
        "scenario": asdict(scenario),
        "settings": {**settings, "threads": threads, "repeats": repeats},
        "peak_flops": peak,
        "peak_measurements": measurements,
        "contended": {
            "rule": contended_rule(threads) if scenario.device == "cpu" else "not applied on GPU",
            "windows": len(windows),
            "contended_windows": sum(w["contended"] for w in windows),
            "peak_measurements": len(measurements),
            "contended_peak_measurements": sum(m["contended"] for m in measurements),
        },
        "load_avg_1_5_15": [load_start, os.getloadavg()],
        "data": data,
        "rows": rows,
        "targets": targets(scenario, rows),
    }


def impls(scenario: Scenario, compiled: bool = False) -> tuple[str, ...]:
    """The measured arms: ours and TRL; SFT also ours with the plain Hugging Face loss, DPO
    also ours with one pair per row (``unpacked``; ours packs several pairs per row);
    ``compiled``: also ours with ``training_args.torch_compile=true``."""
    arms = ("ours", "plain", "trl") if scenario.kind == "sft" else ("ours", "unpacked", "trl")
    return (*arms, "compiled") if compiled else arms


def ratios(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    """ours / other; the MFU ratio is None when either MFU is (inconsistent with the peak)."""
    mfu = None
    if ours["mfu"] is not None and other["mfu"] is not None:
        mfu = ours["mfu"] / other["mfu"]
    return {
        "tokens_per_s": ours["tokens_per_s"] / other["tokens_per_s"],
        "tokens_per_cpu_s": ours["tokens_per_cpu_s"] / other["tokens_per_cpu_s"],
        "examples_per_s": ours["examples_per_s"] / other["examples_per_s"],
        "peak_memory": ours["peak_memory_gb"] / other["peak_memory_gb"],
        "step_memory": ours["step_memory_gb"] / max(other["step_memory_gb"], 1e-9),
        "mfu": mfu,
    }


def targets(scenario: Scenario, rows: list[dict]) -> dict[str, Any]:
    if scenario.kind == "sft":
        row = rows[0]
        mfu = row["ours"]["mfu"]
        return {
            "mfu >= 60%": mfu is not None and mfu >= TARGETS["sft_mfu"],
            "tokens/s >= 10x TRL": row["ratio"]["tokens_per_s"] >= TARGETS["sft_tokens_ratio"],
            "tokens/s > TRL": row["ratio"]["tokens_per_s"] > 1.0,
            "peak memory <= TRL": row["ratio"]["peak_memory"] <= 1.0,
            "peak memory <= 0.75x plain loss": row["ratio_plain"]["peak_memory"]
            <= TARGETS["sft_memory_vs_plain"],
        }
    out = {}
    for row in rows:
        out[f"{row['variant']}: pairs/s >= 3x TRL"] = (
            row["ratio"]["examples_per_s"] >= TARGETS["dpo_pairs_ratio"]
        )
        out[f"{row['variant']}: peak memory <= TRL"] = row["ratio"]["peak_memory"] <= 1.0
    return out


def mfu_against_sft(scenarios: dict[str, Any], device: str) -> dict[str, Any] | None:
    """Our DPO MFU against our SFT MFU on the same model (target ≥ ``dpo_mfu_vs_sft``), per DPO
    row, when both scenarios of ``device`` ran in this invocation."""
    sft, dpo = scenarios.get(f"sft-{device}"), scenarios.get(f"dpo-{device}")
    if not sft or not dpo or "rows" not in sft or "rows" not in dpo:
        return None
    base = sft["rows"][0]["ours"]["mfu"]
    out: dict[str, Any] = {}
    for row in dpo["rows"]:
        mfu = row["ours"]["mfu"]
        out[row["variant"]] = None if mfu is None or not base else mfu / base
    parts = [
        f"{variant} {fmt_ratio(value)} ("
        + ("met" if value is not None and value >= TARGETS["dpo_mfu_vs_sft"] else "NOT met")
        + ")"
        for variant, value in out.items()
    ]
    text = (
        f"dpo-{device} MFU / sft-{device} MFU (ours, target >= {TARGETS['dpo_mfu_vs_sft']}x): "
        + ", ".join(parts)
    )
    return {"ratios": out, "text": text}


def run_data_prep(quick_mode: bool, repeats: int) -> dict[str, Any]:
    from benchmarks import data_prep

    num_examples = 300 if quick_mode else 20_000
    result = data_prep.run_benchmark(num_examples, repeats, 1024, None, 200)
    result["command"] = f"python -m benchmarks.data_prep --num-examples {num_examples}"
    return result


# ----------------------------------------------------------------------------------- report
def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_training(result: dict[str, Any]) -> str:
    s = result["scenario"]
    m = s["model"]
    contended = result["contended"]
    threads = result["settings"]["threads"]
    header = (
        f"{'variant':12} {'impl':8} {'tokens/s':>9} {'(median)':>9} {'pairs/s':>8} {'MFU':>6} "
        f"{'TFLOP/s':>8} {'peak GB':>8} {'step GB':>8} {'tok/step':>8} {'CPU use':>7} "
        f"{'tok/CPU-s':>9} {'contended':>9}"
    )
    lines = [
        f"== {s['name']}: {s['kind'].upper()} on {s['device']}, Llama {m['num_hidden_layers']}L "
        f"h{m['hidden_size']} mlp{m['intermediate_size']} heads {m['num_attention_heads']}/"
        f"{m['num_key_value_heads']}, {s['precision']}, max length {s['max_length']}, batch "
        f"{s['batch_size']}, {s['warmup']} warm-up + {s['steps']} timed steps, "
        f"{threads} thread{'' if threads == 1 else 's'}, best of "
        f"{result['settings']['repeats']} interleaved repeats (median beside)",
        header,
        "-" * len(header),
    ]
    notes = []
    for row in result["rows"]:
        for impl in ("ours", "plain", "unpacked", "trl", "compiled"):
            if impl not in row:
                continue
            r = row[impl]
            pairs = f"{r['examples_per_s']:8.2f}" if s["kind"] == "dpo" else f"{'-':>8}"
            lines.append(
                f"{row['variant']:12} {impl:8} {r['tokens_per_s']:9,.0f} "
                f"{r['median']['tokens_per_s']:9,.0f} {pairs} {fmt_mfu(r['mfu']):>6} "
                f"{r['tflops']:8.4f} {r['peak_memory_gb']:8.2f} {r['step_memory_gb']:8.2f} "
                f"{r['tokens_per_step']:8,.0f} {r['cpu_utilisation']:7.2f} "
                f"{r['tokens_per_cpu_s']:9,.0f} {r['contended_windows']:>5} of {r['windows']}"
            )
            if r["mfu_note"]:
                notes.append(f"{row['variant']} {impl}: {r['mfu_note']}")
        ratio, median = row["ratio"], row["ratio_median"]
        lines.append(
            f"{row['variant']:12} ours/TRL (best; median): tokens/s "
            f"{fmt_ratio(ratio['tokens_per_s'])} ({fmt_ratio(median['tokens_per_s'])}), "
            + (
                f"pairs/s {fmt_ratio(ratio['examples_per_s'])} "
                f"({fmt_ratio(median['examples_per_s'])}), "
                if s["kind"] == "dpo"
                else ""
            )
            + f"MFU {fmt_ratio(ratio['mfu'])}, peak memory {fmt_ratio(ratio['peak_memory'])}, "
            f"tokens per CPU-s {fmt_ratio(ratio['tokens_per_cpu_s'])}"
        )
        if "ratio_plain" in row:
            plain = row["ratio_plain"]
            lines.append(
                f"{row['variant']:12} ours/plain HF loss: tokens/s "
                f"{fmt_ratio(plain['tokens_per_s'])} "
                f"({fmt_ratio(row['ratio_plain_median']['tokens_per_s'])}), peak memory "
                f"{fmt_ratio(plain['peak_memory'])}, memory added by the steps "
                f"{fmt_ratio(plain['step_memory'])}"
            )
        if "ratio_packed" in row:
            lines.append(
                f"{row['variant']:12} packed/unpacked (ours): pairs/s "
                f"{fmt_ratio(row['ratio_packed']['examples_per_s'])} "
                f"({fmt_ratio(row['ratio_packed_median']['examples_per_s'])}), peak memory "
                f"{fmt_ratio(row['ratio_packed']['peak_memory'])}"
            )
        if "ratio_compiled" in row:
            lines.append(
                f"{row['variant']:12} compiled/eager (ours): tokens/s "
                f"{fmt_ratio(row['ratio_compiled']['tokens_per_s'])} "
                f"({fmt_ratio(row['ratio_compiled_median']['tokens_per_s'])}), peak memory "
                f"{fmt_ratio(row['ratio_compiled']['peak_memory'])}"
            )
        lines.append(f"{row['variant']:12} figures and ratios from {row['ratio_from']}")
    lines.extend(notes)
    peak_source = "rated bf16 peak" if s["device"] == "cuda" else "best fp32 matmul measured"
    lines.append(
        f"peak for MFU: {result['peak_flops'] / 1e9:,.1f} GFLOP/s ({peak_source}); contended "
        f"({contended['rule']}): {contended['contended_windows']} of {contended['windows']} "
        f"timed windows, {contended['contended_peak_measurements']} of "
        f"{contended['peak_measurements']} peak measurements; load average (1/5/15 min) at "
        f"start and end: {result['load_avg_1_5_15']}"
    )
    lines.append(
        "targets: "
        + "; ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of every arm (3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=default_threads(),
        help="torch threads (and OMP_NUM_THREADS) of every run and of the peak measurement "
        "(default: every core this process may use, %(default)s here)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="one more arm: ours with training_args.torch_compile=true (compiles in warm-up)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} < 1")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    repeats = args.repeats or (1 if args.quick else 3)

    import torch
    import transformers
    import trl

    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.run", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": args.threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "usable_cpus": default_threads(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1_5_15_start": os.getloadavg(),
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "scenarios": {},
        "complete": False,
    }

    def save() -> None:  # after every scenario: a run cut short keeps what it measured
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        for name in names:
            if name == "data-prep":
                from benchmarks.data_prep import format_table

                log("data-prep")
                result = run_data_prep(args.quick, repeats)
                report["scenarios"][name] = result
                print(f"== data-prep\n{format_table(result)}\n", flush=True)
                save()
                continue
            scenario = DEFAULTS[name]
            if args.quick:
                scenario = quick(scenario)
            scenario = replace(
                scenario,
                steps=args.steps if args.steps is not None else scenario.steps,
                warmup=args.warmup if args.warmup is not None else scenario.warmup,
            )
            reason = skip_reason(scenario)
            if reason is not None:
                report["scenarios"][name] = {"skipped": reason}
                print(f"== {name}: skipped: {reason}\n", flush=True)
                continue
            log(f"{name}: {scenario}, {args.threads} threads")
            result = run_training_scenario(
                scenario,
                repeats,
                Path(tmp),
                args.threads,
                quick_mode=args.quick,
                compiled=args.compile,
            )
            report["scenarios"][name] = result
            print(format_training(result) + "\n", flush=True)
            save()
    for device in ("cpu", "gpu"):
        line = mfu_against_sft(report["scenarios"], device)
        if line:
            report.setdefault("mfu_against_sft", {})[device] = line
            print(line["text"], flush=True)
    report["machine"]["load_avg_1_5_15_end"] = os.getloadavg()
    report["complete"] = True
    save()
    return report


if __name__ == "__main__":
    main()
