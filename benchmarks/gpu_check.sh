#!/usr/bin/env bash
# One prepared command that validates and times the Triton backend on a CUDA machine
# (docs/design.md §8):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default benchmarks/results/<gpu-name>-<date>/
#
# In order: nvidia-smi; the CUDA kernel tests (compiled kernels, every dtype, float64
# oracle) with a per-test timeout; the benchmark at the qwen3-1.7b preset (log-probs and
# the SGSD loss) with triton, torch, reference, cce, liger and torch-compile; the
# deterministic and the atomic backward, timed; a one-screen summary. Planned for one H100
# in under 7 minutes: each step has a hard time limit (120 + 2x100 + 75 s, plus start-up),
# so a slow step is cut, not the run. Whatever is not installed is skipped with the
# reason. Without a GPU it says so and exits 0 at once. Python: $PYTHON, else `python`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

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
note() { SUMMARY+=("$1"); echo "[gpu_check] $1"; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
START=$SECONDS

# 1. The machine.
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" - >"$OUT/versions.txt" 2>&1 <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
git rev-parse HEAD >>"$OUT/versions.txt" 2>/dev/null
note "GPU: $GPU_NAME; $(head -n1 "$OUT/versions.txt"); commit $(git rev-parse --short HEAD 2>/dev/null)"

# 2. CUDA kernel tests against the float64 oracle (step limit 120 s; 60 s per test).
TESTS="tests/kernels/test_oracle.py tests/kernels/test_determinism.py"
if has pytest_timeout; then
    timeout 120 "$PY" -m pytest $TESTS -q -k triton -p no:cacheprovider --timeout=60 \
        --junitxml="$OUT/kernel-tests.xml" >"$OUT/kernel-tests.txt" 2>&1
    rc=$?
else
    rc=0
    for t in $TESTS; do  # no pytest-timeout: the per-file limit stands in for the per-test one
        timeout 60 "$PY" -m pytest "$t" -q -k triton -p no:cacheprovider \
            >>"$OUT/kernel-tests.txt" 2>&1 || rc=$?
    done
fi
note "kernel tests (rc $rc, 124 = timed out): $(grep -E '(passed|failed|error)' "$OUT/kernel-tests.txt" | tail -n1)"

# 3. Benchmark, qwen3-1.7b preset (H 2048, V 151936, bf16): two runs with their own limits.
PROVIDERS="triton,torch,reference,torch-compile"
for pkg in cut_cross_entropy:cce liger_kernel:liger; do
    if has "${pkg%%:*}"; then PROVIDERS="$PROVIDERS,${pkg##*:}"; else
        note "benchmark: ${pkg##*:} skipped (${pkg%%:*} not installed)"; fi
done
for wl in logprobs-fwdbwd sgsd; do
    timeout 100 "$PY" benchmarks/bench_gated_kd.py --preset qwen3-1.7b --providers "$PROVIDERS" \
        --workloads "$wl" --worker-timeout 40 --out "$OUT/bench-$wl" >"$OUT/bench-$wl.txt" 2>&1
    note "benchmark $wl: rc $? (124 = cut at 100 s; rows so far in $OUT/bench-$wl.txt)"
done

# 4. Deterministic (chunked, GEMMs) vs atomic (fused) backward, and the resources of the
#    kernels as the GPU's driver loaded them (compare with benchmarks/results/triton-aot/).
timeout 75 "$PY" - "$OUT" >"$OUT/backward-modes.txt" 2>&1 <<'EOF'
import csv, sys
import torch, sgsd_kernels as sk
from sgsd_kernels.ops.triton_backend import triton_configs

out = sys.argv[1]
N, V, H = 8192, 151936, 2048
rows = []
for dtype in (torch.bfloat16, torch.float32):
    torch.manual_seed(0)
    h = (torch.randn(N, H, device="cuda") * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device="cuda") * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    grads = {}
    for det in (False, True):
        def step():
            h.grad = w.grad = None
            with sk.deterministic(det):
                sk.linear_logprobs(h, w, t, backend="triton").sum().backward()
        step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record(); step(); end.record(); torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        grads[det] = (h.grad.float(), w.grad.float())
        ms = sorted(times)[len(times) // 2]
        rows.append(dict(dtype=str(dtype), mode="deterministic" if det else "atomic", N=N, V=V, H=H,
                         fwd_bwd_ms=round(ms, 2), tflops=round(8 * N * V * H / ms / 1e9, 1)))
        print(rows[-1], flush=True)
    dh = (grads[True][0] - grads[False][0]).abs().max().item()
    dw = (grads[True][1] - grads[False][1]).abs().max().item()
    print(f"{dtype}: max |deterministic - atomic| dh {dh:.2e} dW {dw:.2e}", flush=True)
with open(f"{out}/backward-modes.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0])); writer.writeheader(); writer.writerows(rows)
from triton.runtime.jit import JITFunction
import sgsd_kernels.ops as ops, pkgutil, importlib
for info in pkgutil.walk_packages(ops.__path__, "sgsd_kernels.ops."):
    mod = importlib.import_module(info.name)
    for name, fn in vars(mod).items():
        if isinstance(fn, JITFunction):
            for cache in fn.device_caches.values():
                for k in cache[0].values():
                    k._init_handles()
                    print(f"loaded {info.name.rsplit('.', 1)[-1]}.{name}: {k.n_regs} registers, "
                          f"{k.n_spills} spills, {k.metadata.shared} B shared")
print("family", triton_configs.family(), "tf32", triton_configs.tf32_enabled())
EOF
note "backward modes (rc $?): $(grep -c "'mode'" "$OUT/backward-modes.txt") timings"

# 5. One-screen summary.
{
    echo "# gpu_check: $GPU_NAME, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s"
    echo
    printf -- '- %s\n' "${SUMMARY[@]}"
    echo
    echo '## Kernel tests (failures)'
    grep -E '^(FAILED|ERROR)' "$OUT/kernel-tests.txt" | head -n 8
    echo
    echo '## Backward: atomic vs deterministic'
    grep -E "^\{|max \|" "$OUT/backward-modes.txt"
    echo
    echo '## Benchmark (progress lines)'
    grep -hE '^\[bench\]|triton' "$OUT"/bench-*.txt | grep -vi warn | head -n 14
} | tee "$OUT/summary.md"
echo "[gpu_check] everything is under $OUT"
