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
# (benchmarks/gpu_precision_modes.py); then the trainer at a real model's size: one
# optimizer step of a random-init qwen3-1.7b (benchmarks/bench_train_step.py, K 8, T 1024,
# bf16: the trainer's path against the published one), a three-step `python -m sgsd.train`
# run on that model (vLLM rollouts when vLLM is installed, else HF generate) with its
# checkpoint and a one-step resume, and the step-time split and tokens/s of every step; a
# one-screen summary. $GPU_CHECK_PARTS picks the parts: `kernels` (steps 2-4), `train`
# (steps 5-6), default both. Each step has a hard time limit, so a slow step is cut, not
# the run: kernels 70 + 120 + 50 + 40 s (194 s in all on an H100), train 150 + 210 + 120 s
# (planned, not yet run on a GPU: model build and loads, vLLM start-up, a 3.4 GB checkpoint
# export). Both parts together can pass 10 minutes: on a lent machine with a 10-minute
# command limit, run them as two calls (GPU_CHECK_PARTS=kernels, then =train).
# Whatever is not installed is skipped with the reason. The kernel benchmark times each
# phase over $SGSD_BENCH_CUDA_REP_MS (here 500 ms). Exits with the kernel tests' status,
# else 1 when a train step failed; without a GPU it says so and exits 0 at once.
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

PARTS=${GPU_CHECK_PARTS:-kernels,train}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
TESTS_RC=0
TRAIN_RC=0

if part kernels; then
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
fi

if part train && ! { has transformers && has peft; }; then
    note "train part skipped: the trainer needs transformers and peft (pip install -e \".[train]\")"
elif part train; then
# 5. One SGSD optimizer step on a random-init qwen3-1.7b (V 151936), K 8 teachers, T 1024:
#    the trainer's path (triton and torch kernels) against the published one, interleaved
#    (limit 150 s; the first call also builds the model into the cache the run below uses).
timeout 150 "$PY" benchmarks/bench_train_step.py --device cuda --shape qwen3-1.7b --K 8 \
    --T 1024 --dtype bf16 --repeats 3 --out "$OUT/train-step" >"$OUT/train-step.txt" 2>&1
rc=$?
[[ $rc -ne 0 ]] && TRAIN_RC=1
note "train-step benchmark: rc $rc (124 = cut at 150 s; 2 = step-0 loss mismatch; table in $OUT/train-step.txt)"

# 6. The trainer itself on that model: 3 steps (checkpoint at the end, with the merged
#    model/ export), then resume it for one more step (limits 210 s and 120 s).
ROLLOUTS=${GPU_CHECK_ROLLOUTS:-hf}
has vllm && ROLLOUTS=${GPU_CHECK_ROLLOUTS:-vllm}
RUN="$OUT/train-run"
rm -rf "$RUN"
timeout 210 "$PY" -m sgsd.train --model random:qwen3-1.7b --output-dir "$RUN" --max-steps 3 \
    --problems-per-step 4 --rollouts-per-problem 1 --num-teachers 8 \
    --max-completion-tokens 256 --rollout-backend "$ROLLOUTS" --checkpoint-every 0 \
    --skill-update-every 0 >"$OUT/train-run.txt" 2>&1
rc=$?
[[ $rc -ne 0 ]] && TRAIN_RC=1
note "sgsd.train 3 steps, random:qwen3-1.7b, $ROLLOUTS rollouts: rc $rc (124 = cut at 210 s; log $OUT/train-run.txt)"
if [[ $rc -eq 0 ]]; then
    timeout 120 "$PY" -m sgsd.train --resume --max-steps 4 --output-dir "$RUN" \
        >"$OUT/train-resume.txt" 2>&1
    rc=$?
    [[ $rc -ne 0 ]] && TRAIN_RC=1
    note "sgsd.train resume to step 4: rc $rc (124 = cut at 120 s; log $OUT/train-resume.txt)"
fi
# Step-time split and tokens/s per step, from the run's metrics.jsonl.
"$PY" - "$RUN/metrics.jsonl" >"$OUT/train-steps.md" 2>&1 <<'PYEOF'
import json, sys
print("| step | step s | rollout s | update s | completion tokens | tokens/s | loss |")
print("|---|---|---|---|---|---|---|")
try:
    records = [json.loads(line) for line in open(sys.argv[1])]
except OSError as e:
    records = []
    print(f"(no metrics: {e})")
for r in records:
    print(f"| {r['step']} | {r['step_time_s']:.2f} | {r['rollout_time_s']:.2f} | "
          f"{r['update_time_s']:.2f} | {r['completion_tokens']} | "
          f"{r['completion_tokens_per_s']:.0f} | {r.get('loss', float('nan')):.5f} |")
PYEOF
fi

# 5. One-screen summary.
{
    echo "# gpu_check: $GPU_NAME, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s"
    echo
    printf -- '- %s\n' "${SUMMARY[@]}"
    echo
    echo '## Kernel tests (failures)'
    grep -E '^(FAILED|ERROR)' "$OUT/kernel-tests.txt" 2>/dev/null | head -n 12
    echo
    echo '## Ceilings; the op in bf16, fp32 and TF32'
    grep -E "^ceiling|^\{" "$OUT/precision-modes.txt" 2>/dev/null
    echo
    echo '## Benchmark (progress lines)'
    grep -hE '^\[bench' "$OUT"/bench-*.txt 2>/dev/null | grep -vi warn | tail -n 30
    echo
    echo '## One optimizer step, random qwen3-1.7b (bench_train_step.py)'
    grep -E '^\|' "$OUT/train-step.txt" 2>/dev/null
    echo
    echo '## sgsd.train on random:qwen3-1.7b (3 steps + resumed step 4)'
    cat "$OUT/train-steps.md" 2>/dev/null
} | tee "$OUT/summary.md"
echo "[gpu_check] everything is under $OUT"
[[ $TESTS_RC -ne 0 ]] && exit "$TESTS_RC"
exit "$TRAIN_RC"
