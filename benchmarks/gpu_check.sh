#!/usr/bin/env bash
# The GPU checks of post-training on one CUDA GPU (H100 / H200), designed to finish in under
# 8 minutes (a 450 s budget, GPU_CHECK_BUDGET_S):
#
#   1. optional packages: flash-attn, liger-kernel, deepspeed, each pip-installed from the
#      registry when not importable (torch pinned to the installed version; a failure, such as
#      no network or no prebuilt flash-attn wheel, is reported and the checks go on);
#   2. the GPU tests: .venv/bin/python -m pytest -m gpu -n 0;
#   3. the sft-gpu and dpo-gpu scenarios of benchmarks.run with fewer steps (2 warm-up + 3
#      timed, one repeat), then a compact table: tokens/s, MFU against the card's dense bf16
#      peak, peak memory, ours/TRL.
#
#   benchmarks/gpu_check.sh [--no-install]
#
# Exit codes: 0 every check passed, or there is no GPU here (the message starts
# "gpu_check: no GPU here"; nothing is installed or run); 1 the GPU tests or the benchmark
# failed; 2 bad arguments; 3 no Python environment (.venv/bin/python, or GPU_CHECK_PYTHON).
# Outputs (logs, bench.json) go to artifacts/gpu_check/ (GPU_CHECK_OUT).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 3
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
NVIDIA_SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
OUT=${GPU_CHECK_OUT:-artifacts/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
INSTALL=1

for arg in "$@"; do
    case $arg in
        --no-install) INSTALL=0 ;;
        -h | --help)
            sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_check: unknown argument '$arg' (only --no-install)" >&2
            exit 2
            ;;
    esac
done

no_gpu() {
    echo "gpu_check: no GPU here ($1); nothing to check, exiting 0"
    exit 0
}

# ------------------------------------------------------------------------- is there a GPU?
if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
    no_gpu "nvidia-smi not found"
fi
if ! gpu=$("$NVIDIA_SMI" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
    no_gpu "nvidia-smi failed: ${gpu%%$'\n'*}"
fi
if [[ ! -x $PY ]]; then
    echo "gpu_check: $PY not found: create the project's virtual environment first" >&2
    exit 3
fi
cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>&1)
if [[ $cuda != "True" ]]; then
    no_gpu "torch.cuda.is_available() is ${cuda##*$'\n'}"
fi

mkdir -p "$OUT"
echo "gpu_check: ${gpu%%$'\n'*}; $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

left() { echo $((BUDGET - SECONDS)); }
# A phase's time limit: at most $1 s, and never into the $2 s kept for the phases after it.
limit() {
    local cap=$1 keep=$2 rest
    rest=$(($(left) - keep))
    if ((rest < cap)); then cap=$rest; fi
    if ((cap < 0)); then cap=0; fi
    echo "$cap"
}

# ------------------------------------------------------------------- 1. optional packages
declare -A INSTALLED
CONSTRAINTS="$OUT/constraints.txt"
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$CONSTRAINTS"
# package:module:cap seconds (flash-attn fetches a prebuilt wheel or compiles; the cap stops it)
for entry in flash-attn:flash_attn:100 liger-kernel:liger_kernel:45 deepspeed:deepspeed:60; do
    IFS=: read -r package module cap <<<"$entry"
    if "$PY" -c "import $module" >/dev/null 2>&1; then
        INSTALLED[$package]="present"
        continue
    fi
    if ((INSTALL == 0)); then
        INSTALLED[$package]="absent (--no-install)"
        continue
    fi
    t=$(limit "$cap" 330)  # keep 330 s for the tests and the benchmark
    if ((t < 10)); then
        INSTALLED[$package]="absent (no time left to install)"
        continue
    fi
    extra=()
    if [[ $package == flash-attn ]]; then extra=(--no-build-isolation); fi
    echo "gpu_check: pip install $package (at most ${t} s)"
    if timeout --kill-after=5 "$t" "$PY" -m pip install --quiet --retries 0 --timeout 15 \
        -c "$CONSTRAINTS" "${extra[@]}" "$package" >"$OUT/pip-$package.log" 2>&1 &&
        "$PY" -c "import $module" >>"$OUT/pip-$package.log" 2>&1; then
        INSTALLED[$package]="installed"
    else
        reason=$(grep -m1 -E 'ERROR|error:' "$OUT/pip-$package.log" | cut -c1-120)
        INSTALLED[$package]="install FAILED (${reason:-timed out or failed}; $OUT/pip-$package.log)"
    fi
done

# ---------------------------------------------------------------------------- 2. GPU tests
t=$(limit 150 250)  # keep 250 s for the benchmark
echo "gpu_check: pytest -m gpu (at most ${t} s)"
timeout --kill-after=10 "$t" "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider -q \
    >"$OUT/pytest.log" 2>&1
tests_rc=$?
tests_line=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/pytest.log" | tail -1)
if ((tests_rc == 124 || tests_rc == 137)); then tests_line="timed out after ${t} s"; fi

# ---------------------------------------------------------------------------- 3. benchmark
t=$(limit 600 10)
echo "gpu_check: benchmarks.run sft-gpu dpo-gpu (at most ${t} s)"
rm -f "$OUT/bench.json"  # benchmarks.run rewrites it after each scenario: a cut-short run keeps sft-gpu
timeout --kill-after=10 "$t" "$PY" -m benchmarks.run sft-gpu dpo-gpu --warmup 2 --steps 3 \
    --repeats 1 --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_rc=$?

if [[ -s $OUT/bench.json ]]; then
    "$PY" - "$OUT/bench.json" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
print(f"\n{'scenario':9} {'variant':12} {'impl':5} {'tokens/s':>9} {'pairs/s':>8} {'MFU':>6} "
      f"{'peak GB':>8} {'ours/TRL tokens/s':>17}")
for name, result in report["scenarios"].items():
    if "skipped" in result:
        print(f"{name:9} skipped: {result['skipped']}")
        continue
    for row in result["rows"]:
        for impl in ("ours", "plain", "trl"):
            if impl not in row:
                continue
            r = row[impl]
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            pairs = f"{r['examples_per_s']:8.2f}" if result["scenario"]["kind"] == "dpo" else "-".rjust(8)
            ratio = f"{row['ratio']['tokens_per_s']:.2f}x" if impl == "ours" else ""
            print(f"{name:9} {row['variant']:12} {impl:5} {r['tokens_per_s']:9,.0f} {pairs} "
                  f"{mfu:>6} {r['peak_memory_gb']:8.2f} {ratio:>17}")
            if r["mfu_note"]:
                print(f"{'':9} {r['mfu_note']}")
    print(f"{name:9} MFU against {result['peak_flops'] / 1e12:,.0f} TFLOP/s, the dense bf16 peak of "
          f"{report['machine']['cuda']} (rated; measured for a card post_training.utils.flops "
          "does not list); peak GB = torch.cuda.max_memory_allocated")
EOF
fi

# ------------------------------------------------------------------------------ summary
echo
echo "gpu_check summary (${SECONDS} s):"
for package in flash-attn liger-kernel deepspeed; do
    echo "  $package: ${INSTALLED[$package]}"
done
if ((tests_rc == 0)); then
    echo "  GPU tests: passed ($tests_line)"
else
    echo "  GPU tests: FAILED, exit $tests_rc ($tests_line); $OUT/pytest.log:"
    tail -20 "$OUT/pytest.log" | sed 's/^/    /'
fi
if ((bench_rc == 0)); then
    echo "  benchmark: done ($OUT/bench.json, $OUT/bench.log)"
else
    echo "  benchmark: FAILED, exit $bench_rc (124: the time limit); $OUT/bench.log:"
    tail -20 "$OUT/bench.log" | sed 's/^/    /'
fi
if ((tests_rc != 0 || bench_rc != 0)); then
    exit 1
fi
exit 0
