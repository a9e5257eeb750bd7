#!/usr/bin/env bash
# One prepared command that validates and times the Triton backend on a CUDA machine
# (docs/design.md §8):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default benchmarks/results/<gpu-name>-<date>/
#
# In order: nvidia-smi and versions; the CUDA kernel tests (compiled kernels, every dtype,
# float64 oracle; the native CPU backend left out) with a per-test timeout; the benchmark
# at the qwen3-1.7b head (V 151936, H 2048, bf16): log-probs at N=8192 against the
# published path, Cut Cross-Entropy and Liger, then the SGSD loss (K=8, N=4096) against
# the published path; the card's copy and GEMM ceilings and the op in bf16, fp32 and TF32
# (benchmarks/gpu_precision_modes.py); a one-screen summary. Planned for one H100 in about
# 4 minutes (194 s on an H100): each step has a hard time limit (70 + 120 + 50 + 40 s, plus
# start-up), so a slow step is cut, not the run. Whatever is not installed is skipped with
# the reason. The benchmark times each phase over $SGSD_BENCH_CUDA_REP_MS (here 500 ms).
# Exits with the kernel tests' status; without a GPU it says so and exits 0 at once.
# Python: $PYTHON, else python3.
set -uo pipefail
PY=${PYTHON:-python3}
# Paths given relative to the caller's directory, made absolute before the cd (a venv's
# python keeps its own path: realpath would follow its symlink out of the venv).
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
if [[ $# -ge 1 ]]; then set -- "$(realpath -m "$1")"; fi
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU here (nvidia-smi is missing or lists no device): nothing to check."
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: a GPU is present but this Python's torch has no CUDA (install a CUDA"
    echo "torch first, see README): nothing to check."
    exit 0
fi

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
OUT=${1:-benchmarks/results/${SLUG}-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
SUMMARY=()
note() { SUMMARY+=("$1"); echo "[gpu_check $((SECONDS - START))s] $1"; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
START=$SECONDS

# 1. The machine.
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" - >"$OUT/versions.txt" 2>&1 <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("cut_cross_entropy", "liger_kernel"):
    try:
        from importlib.metadata import version
        print(name, version(name.replace("_", "-")))
    except Exception as e:
        print(name, "not installed:", type(e).__name__)
PYEOF
# A copy of the tree without .git (a lent machine) names its commit in $SGSD_COMMIT.
COMMIT=${SGSD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $COMMIT" >>"$OUT/versions.txt"
note "GPU: $GPU_NAME; $(head -n1 "$OUT/versions.txt"); commit $COMMIT"

# 2. CUDA kernel tests against the float64 oracle (step limit 70 s; 60 s per test; the
#    native backend is CPU-only and CI's job).
TESTS="tests/kernels/test_oracle.py tests/kernels/test_determinism.py
       tests/kernels/test_divergence_oracle.py tests/kernels/test_divergence_triton_mixture.py
       tests/kernels/test_local_support.py tests/kernels/test_triton_configs.py"
PYTEST_ARGS=(-q -rfE -k "not native" -p no:cacheprovider --durations=10)
has pytest_timeout && PYTEST_ARGS+=(--timeout=60)
has xdist && PYTEST_ARGS+=(-n 12)
timeout 70 "$PY" -m pytest $TESTS "${PYTEST_ARGS[@]}" >"$OUT/kernel-tests.txt" 2>&1
TESTS_RC=$?
rc=$TESTS_RC
note "kernel tests (rc $rc, 124 = cut at 70 s): $(grep -E '(passed|failed|error)' "$OUT/kernel-tests.txt" | tail -n1)"

# 3. Benchmark at the qwen3-1.7b head, two runs with their own limits.
PROVIDERS="triton,reference"
for pkg in cut_cross_entropy:cce liger_kernel:liger; do
    if has "${pkg%%:*}"; then PROVIDERS="$PROVIDERS,${pkg##*:}"; else
        note "benchmark: ${pkg##*:} skipped (${pkg%%:*} not installed)"; fi
done
export SGSD_BENCH_CUDA_REP_MS=${SGSD_BENCH_CUDA_REP_MS:-500}
bench() {  # NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$PY" benchmarks/bench_gated_kd.py --preset qwen3-1.7b --worker-timeout 60 \
        --out "$OUT/bench-$name" "$@" >"$OUT/bench-$name.txt" 2>&1
    note "benchmark $name: rc $? (124 = cut at $limit s; rows so far in $OUT/bench-$name.txt)"
}
bench logprobs 120 --workloads logprobs-fwd,logprobs-fwdbwd --tokens 8192 --providers "$PROVIDERS"
bench sgsd 50 --workloads sgsd --tokens 4096 --providers triton,reference

# 4. Ceilings, the op in each operand precision, the kernels as the driver loaded them.
timeout 40 "$PY" benchmarks/gpu_precision_modes.py "$OUT" --tokens 4096 >"$OUT/precision-modes.txt" 2>&1
note "precision modes (rc $?): $(grep -c "'mode'" "$OUT/precision-modes.txt") timings"

# 5. One-screen summary.
{
    echo "# gpu_check: $GPU_NAME, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s"
    echo
    printf -- '- %s\n' "${SUMMARY[@]}"
    echo
    echo '## Kernel tests (failures)'
    grep -E '^(FAILED|ERROR)' "$OUT/kernel-tests.txt" | head -n 12
    echo
    echo '## Ceilings; the op in bf16, fp32 and TF32'
    grep -E "^ceiling|^\{" "$OUT/precision-modes.txt"
    echo
    echo '## Benchmark (progress lines)'
    grep -hE '^\[bench' "$OUT"/bench-*.txt | grep -vi warn | tail -n 30
} | tee "$OUT/summary.md"
echo "[gpu_check] everything is under $OUT"
exit "$TESTS_RC"
