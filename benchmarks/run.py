"""Training throughput, MFU and peak memory of our trainers against TRL 1.x on identical work.

    python -m benchmarks.run [SCENARIO ...] [--steps N] [--warmup W] [--repeats R] [--quick]
                             [--json OUT]

Scenarios (default: all of them; the GPU ones skip, saying why, without CUDA):

- ``sft-cpu``: SFT with packing (best-fit decreasing, 1024-token rows; TRL: ``packing=True,
  packing_strategy="bfd"``, padding-free, ``assistant_only_loss=True``), fp32, SDPA, a 32k
  vocabulary. A third arm, ``plain``, is our loop with the plain Hugging Face loss
  (``model(..., labels=...).loss`` on full-vocabulary logits) in place of our chunked one: the
  memory the chunked LM head saves.
- ``dpo-cpu``: sigmoid DPO (beta 0.1), two sub-rows: a live reference model, and reference
  log-probs precomputed before training (ours: ``reference.precompute=true``; TRL:
  ``precompute_ref_log_probs=True``).
- ``data-prep``: SFT data preparation (tokenize + mask + pack), :mod:`benchmarks.data_prep`.
- ``sft-gpu`` / ``dpo-gpu``: the same on a ~1B Llama (random init), bf16, flash-attention
  varlen when ``flash_attn`` is installed (else SDPA), 4096-token packed rows, our chunked loss.

Both implementations get the same model config (random init from seed 0), the same data (a
fixed synthetic chat set with log-normal, long-tailed lengths, from ``benchmarks.data_prep``),
tokenizer, chat format (chatml; only assistant replies are trained), batch, max length,
precision, optimizer settings (AdamW, constant lr, no warm-up, clip 1.0, no gradient
checkpointing) and number of steps. Every measured run is a fresh process
(:mod:`benchmarks.train_worker`, whose docstring says exactly what is timed); the two
implementations alternate, ``--repeats`` times, and the median over repeats is reported:
non-pad tokens/s, pairs/s (DPO), peak memory (peak RSS of the process on CPU, CUDA max
allocated on GPU), MFU (``post_training.utils.flops``: 6·N + 12·L·H·D·S FLOPs per token against
the dense bf16 peak of the GPU, or on CPU a fp32 matmul peak measured at start-up in the same
process), and ours/TRL ratios.
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


def run_worker(spec: dict[str, Any], workdir: Path, name: str, artifacts: Path) -> dict:
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "POST_TRAINING_ARTIFACTS_DIR": str(artifacts),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
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


def median_row(runs: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    """Medians over repeats; MFU against the scenario's one peak (see :func:`machine_peak`)."""
    keys = ("tokens_per_s", "examples_per_s", "tflops", "peak_memory_gb", "step_memory_gb")
    keys += ("timed_s",)
    keys += ("cpu_utilisation", "tokens_per_cpu_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["mfu"] = out["tflops"] * 1e12 / peak
    out["tokens_per_step"] = runs[0]["tokens_per_step"]
    out["runs"] = runs
    return out


def machine_peak(device: str) -> float:
    """The peak FLOP/s for MFU: the GPU's dense bf16 peak; on CPU the best fp32 matmul of a
    measurement here (sizes 1024-2048, best of 5), raised to any higher one a worker measured
    at its start-up: the highest seen, so the most conservative MFU."""
    import torch

    from post_training.utils.flops import device_peak_flops, measure_matmul_peak

    if device == "cuda":
        return device_peak_flops("cuda")
    return measure_matmul_peak(torch.device("cpu"), torch.float32, (1024, 1536, 2048), 5)


def run_training_scenario(scenario: Scenario, repeats: int, root: Path) -> dict[str, Any]:
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
    load_start = os.getloadavg()
    peak = machine_peak(scenario.device)
    runs: dict[tuple[str | None, str], list[dict]] = {}
    for repeat in range(repeats):
        for ref in variants:
            for impl in impls(scenario):
                name = f"{impl}-{ref or 'sft'}-{repeat}"
                result = run_worker(
                    {**base, "impl": impl, "ref": ref}, workdir, name, root / "artifacts"
                )
                runs.setdefault((ref, impl), []).append(result)
                log(
                    f"{scenario.name} {name}: {result['tokens_per_s']:,.0f} tokens/s, "
                    f"{result['examples_per_s']:.2f} ex/s, MFU {result['mfu']:.1%} (of its "
                    f"{result['peak_flops'] / 1e9:.0f} GFLOP/s), "
                    f"peak {result['peak_memory_gb']:.2f} GB, CPU use "
                    f"{result['cpu_utilisation']:.2f} ({result['wall_s']:.0f} s)"
                )
    if scenario.device == "cpu":
        peak = max([peak, *(r["peak_flops"] for rs in runs.values() for r in rs)])
    rows = []
    for ref in variants:
        row: dict[str, Any] = {"variant": ref or "packed"}
        for impl in impls(scenario):
            row[impl] = median_row(runs[(ref, impl)], peak)
        row["ratio"] = ratios(row["ours"], row["trl"])
        if "plain" in row:
            row["ratio_plain"] = ratios(row["ours"], row["plain"])
        rows.append(row)
    settings = {k: v for k, v in base.items() if k not in ("model_dir", "data_path")}
    return {
        "scenario": asdict(scenario),
        "settings": settings,
        "peak_flops": peak,
        "load_avg_1_5_15": [load_start, os.getloadavg()],
        "data": data,
        "rows": rows,
        "targets": targets(scenario, rows),
    }


def impls(scenario: Scenario) -> tuple[str, ...]:
    """The measured arms: ours and TRL; SFT also ours with the plain Hugging Face loss."""
    return ("ours", "plain", "trl") if scenario.kind == "sft" else ("ours", "trl")


def ratios(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    return {
        "tokens_per_s": ours["tokens_per_s"] / other["tokens_per_s"],
        "tokens_per_cpu_s": ours["tokens_per_cpu_s"] / other["tokens_per_cpu_s"],
        "examples_per_s": ours["examples_per_s"] / other["examples_per_s"],
        "peak_memory": ours["peak_memory_gb"] / other["peak_memory_gb"],
        "step_memory": ours["step_memory_gb"] / max(other["step_memory_gb"], 1e-9),
        "mfu": ours["mfu"] / other["mfu"],
    }


def targets(scenario: Scenario, rows: list[dict]) -> dict[str, Any]:
    if scenario.kind == "sft":
        row = rows[0]
        return {
            "mfu >= 60%": row["ours"]["mfu"] >= TARGETS["sft_mfu"],
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


def run_data_prep(quick_mode: bool, repeats: int) -> dict[str, Any]:
    from benchmarks import data_prep

    num_examples = 300 if quick_mode else 20_000
    result = data_prep.run_benchmark(num_examples, repeats, 1024, None, 200)
    result["command"] = f"python -m benchmarks.data_prep --num-examples {num_examples}"
    return result


# ----------------------------------------------------------------------------------- report
def format_training(result: dict[str, Any]) -> str:
    s = result["scenario"]
    m = s["model"]
    header = (
        f"{'variant':12} {'impl':5} {'tokens/s':>9} {'pairs/s':>8} {'MFU':>6} {'TFLOP/s':>8} "
        f"{'peak GB':>8} {'step GB':>8} {'tok/step':>8} {'CPU use':>7} {'tok/CPU-s':>9}"
    )
    lines = [
        f"== {s['name']}: {s['kind'].upper()} on {s['device']}, Llama {m['num_hidden_layers']}L "
        f"h{m['hidden_size']} mlp{m['intermediate_size']} heads {m['num_attention_heads']}/"
        f"{m['num_key_value_heads']}, {s['precision']}, max length {s['max_length']}, batch "
        f"{s['batch_size']}, {s['warmup']} warm-up + {s['steps']} timed steps, median of "
        f"{len(result['rows'][0]['ours']['runs'])}",
        header,
        "-" * len(header),
    ]
    for row in result["rows"]:
        for impl in ("ours", "plain", "trl"):
            if impl not in row:
                continue
            r = row[impl]
            pairs = f"{r['examples_per_s']:8.2f}" if s["kind"] == "dpo" else f"{'-':>8}"
            lines.append(
                f"{row['variant']:12} {impl:5} {r['tokens_per_s']:9,.0f} {pairs} "
                f"{r['mfu']:6.1%} {r['tflops']:8.4f} {r['peak_memory_gb']:8.2f} "
                f"{r['step_memory_gb']:8.2f} "
                f"{r['tokens_per_step']:8,.0f} {r['cpu_utilisation']:7.2f} "
                f"{r['tokens_per_cpu_s']:9,.0f}"
            )
        ratio = row["ratio"]
        lines.append(
            f"{row['variant']:12} ours/TRL: tokens/s {ratio['tokens_per_s']:.2f}x, "
            + (f"pairs/s {ratio['examples_per_s']:.2f}x, " if s["kind"] == "dpo" else "")
            + f"MFU {ratio['mfu']:.2f}x, peak memory {ratio['peak_memory']:.2f}x, "
            f"tokens per CPU-s {ratio['tokens_per_cpu_s']:.2f}x"
        )
        if "ratio_plain" in row:
            plain = row["ratio_plain"]
            lines.append(
                f"{row['variant']:12} ours/plain HF loss: tokens/s {plain['tokens_per_s']:.2f}x, "
                f"peak memory {plain['peak_memory']:.2f}x, memory added by the steps "
                f"{plain['step_memory']:.2f}x"
            )
    lines.append(
        f"peak for MFU: {result['peak_flops'] / 1e9:,.1f} GFLOP/s; CPU use = CPU s per wall s "
        f"of the timed steps (= threads when uncontended); load average (1/5/15 min) at start "
        f"and end: {result['load_avg_1_5_15']}"
    )
    lines.append(
        "targets: "
        + "; ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=None, help="runs per implementation")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
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
        "machine": {
            "cpu_count": os.cpu_count(),
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
    }
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        for name in names:
            if name == "data-prep":
                from benchmarks.data_prep import format_table

                log("data-prep")
                result = run_data_prep(args.quick, repeats)
                report["scenarios"][name] = result
                print(f"== data-prep\n{format_table(result)}\n", flush=True)
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
            log(f"{name}: {scenario}")
            result = run_training_scenario(scenario, repeats, Path(tmp))
            report["scenarios"][name] = result
            print(format_training(result) + "\n", flush=True)
    report["machine"]["load_avg_1_5_15_end"] = os.getloadavg()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
