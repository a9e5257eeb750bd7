"""Compile every Triton kernel of sgsd_kernels for real GPU targets on a machine without a
GPU, in every launch configuration the dispatcher can pick, and report registers, spills,
shared memory, MMA kind and operand precision (docs/design.md §8).

    python tools/triton_aot.py --arch sm_80,sm_90 --out DIR [--dump-ptx] [--quick] [--jobs N]

How: a stand-in Triton driver reports the target (``GPUTarget("cuda", 90, 32)``) and the
SM count, and ``JITFunction.run`` is forced to ``warmup=True``, so the package's public
functions run on small CPU tensors and every kernel launch becomes a compile with exactly
the launcher's arguments and constexprs. Nothing is executed; outputs are uninitialised.
Only Triton's compiler and its bundled ptxas are used. Every ``@triton.jit`` function of
the package must be launched or called from a launched kernel, or the tool fails: it finds
kernels by walking the package, not by module name.

Writes DIR/triton-aot.csv and DIR/triton-aot.md (one row per kernel, arch, dtype, variant,
config) and, with --dump-ptx, DIR/ptx/<kernel>__<arch>__<dtype>__<variant>__<config>.ptx.
dtype "tf32" means fp32 inputs with TF32 enabled by the user in PyTorch. Exits 1 on any
compile failure, naming the kernel and config. --quick (the CI test) compiles the default
configs only, with every flag on (the largest variant of each kernel). --jobs (default 2)
compiles that many architectures in parallel processes; --only REGEX (on
``module.function``) and --dtypes narrow the run to some kernels and dtypes (iterating on
one kernel takes seconds per compile); --from-csv rewrites the reports.
The full sm_80 + sm_90 run is about 800 compiles; the 560 before the soft-cap variants took
about 15 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import pkgutil
import re
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be real JITFunctions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, made explicit
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
from triton_aot_report import COLUMNS, configs, read_csv, write_reports  # noqa: E402  (tools/)

SMS = {80: 108, 86: 84, 89: 128, 90: 132}  # A100, RTX 3090, RTX 4090, H100 SXM
DTYPES = ("fp16", "bf16", "fp32", "tf32", "fp64")


class StandInDriver:
    """Just enough of a Triton driver to compile for ``cc`` without a GPU."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.cc = cc
        self.target = GPUTarget("cuda", cc, 32)
        props = {"multiprocessor_count": SMS.get(cc, 108), "max_shared_mem": 0}
        self.utils = type("Utils", (), {"get_device_properties": staticmethod(lambda d: props)})

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.cc  # one JIT cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


class Recorder:
    """Forces launches to compile only, and records one row per new compile."""

    def __init__(self, only: str | None = None):
        self.only = re.compile(only) if only else None
        self.rows: list[dict] = []
        self.ptx: dict[str, str] = {}
        self.failures: list[str] = []
        self.launched: set = set()
        self.context = dict(arch="", dtype="", default=True)
        self._seen: set = set()
        self._usage: dict = {}  # compiled kernel -> (registers, spill bytes, compile s)

    def install(self):
        import triton
        from triton.runtime.jit import JITFunction

        triton.knobs.nvidia.dump_ptxas_log = True
        # Bypass Triton's disk cache: ptxas reports resource usage only when it runs, and
        # compile_s stays honest.
        triton.knobs.compilation.always_compile = True
        original = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.launched.add(fn)
            if not recorder.wanted(fn):
                return None  # filtered out by --only: nothing compiled, nothing recorded
            start = time.perf_counter()
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:
                msg = f"{fn.__name__} [{recorder.context['arch']} {recorder.context['dtype']}"
                msg += f" {_config_name(kwargs)}]: {type(exc).__name__}: {str(exc)[:2000]}"
                recorder.failures.append(msg)
                raise
            recorder.add(fn, kwargs, kernel, time.perf_counter() - start, log.getvalue())
            return kernel

        JITFunction.run = run

    def wanted(self, fn) -> bool:
        return self.only is None or bool(self.only.search(_kernel_name(fn)))

    def add(self, fn, kwargs, kernel, seconds, log):
        ctx = self.context
        row = dict(
            kernel=_kernel_name(fn),
            arch=ctx["arch"],
            dtype=ctx["dtype"],
            variant=_variant(kwargs),
            config=_config_name(kwargs),
        )
        key = tuple(row.values())
        if key in self._seen:
            if ctx["default"]:  # compiled earlier in this run as an autotune candidate
                for old in self.rows:
                    if tuple(old[c] for c in COLUMNS[:5]) == key:
                        old["default"] = True
            return
        self._seen.add(key)
        if kernel not in self._usage:  # else: the same binary, launched for another dtype
            self._usage[kernel] = (*_ptxas_usage(log, fn.__name__), round(seconds, 2))
        regs, spills, compile_s = self._usage[kernel]
        ptx = kernel.asm["ptx"]
        row.update(
            default=bool(ctx["default"]),
            registers=regs,
            spill_bytes=spills,
            shared_bytes=int(kernel.metadata.shared),
            mma=_mma(ptx),
            operand_precision=_precision(kernel.asm["ttir"], ctx["dtype"]),
            compile_s=compile_s,
        )
        self.rows.append(row)
        self.ptx["__".join(str(v) for v in key)] = ptx


def _kernel_name(fn) -> str:
    """module.function, the report's kernel column (e.g. linear_divergence._fwd_kernel)."""
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def _variant(kwargs) -> str:
    flags = [
        name.lower()
        for name in (
            "HAS_BIAS",
            "HAS_TBIAS",
            "WITH_ENTROPY",
            "TWO_STREAMS",
            "HAS_CLIP",
            "HAS_SOFTCAP",
        )
        if kwargs.get(name) is True
    ]
    if "BETA_MODE" in kwargs:  # the divergence kernels: 0 forward KL, 1 reverse KL, 2 β-JSD
        flags.append(f"beta_mode{kwargs['BETA_MODE']}")
    return "+".join(flags) or "plain"


def _config_name(kwargs) -> str:
    short = {"BLOCK_N": "n", "BLOCK_V": "v", "BLOCK_H": "h", "BLOCK_T": "t"}
    parts = [f"{short[k]}{kwargs[k]}" for k in short if k in kwargs]
    parts.append(f"w{kwargs.get('num_warps', 4)}")
    parts.append(f"s{kwargs.get('num_stages', 3)}")
    if kwargs.get("maxnreg") is not None:  # ptxas register cap (.maxnreg)
        parts.append(f"r{kwargs['maxnreg']}")
    return "-".join(parts)


def _ptxas_usage(log: str, name: str) -> tuple[int, int]:
    """(registers, spill-store bytes) from ptxas -v output (Triton prints it when
    ``knobs.nvidia.dump_ptxas_log`` is set and ptxas runs)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas resource usage for {name} :\n{log}")
    return int(regs.group(1)), int(spills.group(1))


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def _precision(ttir: str, dtype: str) -> str:
    if "tt.dot" not in ttir:
        return "no-dot"
    if dtype in ("fp16", "bf16", "fp64"):
        return dtype
    found = set(re.findall(r"inputPrecision = (\w+)", ttir))
    if len(found) > 1:
        return "mixed:" + "/".join(sorted(found))
    return found.pop() if found else "ieee"  # TTIR omits the attribute when it is ieee


def _discover():
    """Every JITFunction defined in sgsd_kernels, by walking all its modules."""
    from triton.runtime.jit import JITFunction

    import sgsd_kernels

    found = set()
    for info in pkgutil.walk_packages(sgsd_kernels.__path__, "sgsd_kernels."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                found.add(value)
    return found


def _reachable(launched):
    from triton.runtime.jit import JITFunction

    seen, todo = set(launched), list(launched)
    while todo:
        fn = todo.pop()
        for name in re.findall(r"\b\w+\b", fn.src):
            value = fn.fn.__globals__.get(name)
            if isinstance(value, JITFunction) and value not in seen:
                seen.add(value)
                todo.append(value)
    return seen


def _allow_cpu_triton():
    """The public functions reject backend='triton' on CPU tensors outside the
    interpreter; here the CPU tensors only carry shapes, dtypes and strides."""
    import torch

    import sgsd_kernels.runtime as runtime

    original = runtime.resolve_backend

    def resolve(backend, device):
        return original(backend, torch.device("cuda") if device.type == "cpu" else device)

    for name, module in list(sys.modules.items()):
        if name.startswith("sgsd_kernels") and getattr(module, "resolve_backend", None) is original:
            module.resolve_backend = resolve


def _cases(quick: bool):
    """Flag combinations to drive (every one, or with --quick every flag on). Tile configs
    do not depend on N; the small-N split of V and the block sizes of the logits and
    gated-loss kernels (which grow with V and T up to a cap) do: N = 256 reaches the caps,
    N = 16 the small blocks. The soft cap (docs/design.md §3.3) is a constexpr of the
    kernels over the logits only, whose variants do not depend on N or on the weight
    gradient: its cases are N = 256 with the weight gradient, each bias and entropy."""
    if quick:
        return [dict(n=256, bias=True, entropy=True, weight_grad=True, softcap=True)]
    plain = [
        dict(n=n, bias=bias, entropy=entropy, weight_grad=weight_grad, softcap=False)
        for n in (256, 16)
        for bias in (False, True)
        for entropy in (False, True)
        for weight_grad in (False, True)
    ]
    capped = [
        dict(n=256, bias=bias, entropy=entropy, weight_grad=True, softcap=True)
        for bias in (False, True)
        for entropy in (False, True)
    ]
    return plain + capped


def _drive(dtype_name: str, case: dict, quick: bool = False):
    """Run the public API once (forward and backward) with shapes for ``case``; a soft-cap
    case of the full run drives only the kernels over the logits (the others have no soft
    cap, and the plain cases compile them)."""
    import torch

    import sgsd_kernels as sk

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}.get(
        dtype_name, torch.float32
    )
    n, V, H, K = case["n"], 512, 64, 2
    bias = torch.zeros(V, dtype=dtype, requires_grad=case["weight_grad"]) if case["bias"] else None
    weight = torch.zeros(V, H, dtype=dtype, requires_grad=case["weight_grad"])
    hidden = torch.zeros(n, H, dtype=dtype, requires_grad=True)
    targets = torch.zeros(n, dtype=torch.long)
    head = dict(softcap=30.0) if case["softcap"] else {}
    out = sk.linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=case["entropy"], backend="triton", **head
    )
    loss = sum(t.sum() for t in out) if isinstance(out, tuple) else out.sum()
    loss.backward()
    # Logits and the gated loss: their block sizes grow with V and T up to a cap
    # (4096 and 1024 on GPU); N = 256 drives the caps, smaller N smaller blocks.
    v_logits, t_gate = (8192, 1024) if n >= 256 else (V, n)
    others = quick or not case["softcap"]
    if others:
        logits = torch.zeros(n, v_logits, dtype=dtype, requires_grad=True)
        out = sk.logprobs_from_logits(
            logits, targets, return_entropy=case["entropy"], backend="triton"
        )
        (sum(t.sum() for t in out) if isinstance(out, tuple) else out.sum()).backward()
    with torch.no_grad():  # the two-stream forward (its backward is linear_logprobs')
        sk.linear_gated_kd_loss(
            hidden[None],
            weight,
            targets[None],
            torch.ones(1, n, dtype=torch.bool),
            torch.ones(1),
            torch.full((1, K), 0.5),
            teacher_hidden=torch.zeros(1, K, n, H, dtype=dtype),
            bias=bias,
            backend="triton",
            **head,
        )
    # The full-vocabulary divergence: forward KL with the element clip (the OPSD
    # default), the β-JSD with and without the clip and the reverse KL. The three
    # BETA_MODEs are different element-wise code, so --quick drives them all.
    for beta, clip in ((0.0, 0.05), (0.5, None), (0.5, 0.05), (1.0, None)):
        student = torch.zeros(n, H, dtype=dtype, requires_grad=True)
        d = sk.linear_divergence(
            student,
            weight,
            torch.zeros(n, H, dtype=dtype),
            bias=bias,
            teacher_bias=None if bias is None else bias.detach(),
            beta=beta,
            elementwise_clip=clip,
            backend="triton",
            **head,
        )
        d.sum().backward()
    if not others:
        return
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.zeros(1, t_gate, dtype=acc, requires_grad=True)
    res = sk.gated_kd_loss(
        s,
        torch.zeros(1, K, t_gate, dtype=acc),
        torch.ones(1, t_gate, dtype=torch.bool),
        torch.ones(1),
        torch.full((1, K), 0.5),
        backend="triton",
    )
    res.loss.backward()


def compile_all(archs: list[int], quick: bool, only: str | None = None, dtypes=DTYPES) -> Recorder:
    import torch
    from triton.runtime import driver

    triton_configs = configs()

    recorder = Recorder(only)
    recorder.install()
    kernels = _discover()
    _allow_cpu_triton()
    matmul = torch.backends.cuda.matmul
    passes = [(False, True)] if quick else [(False, True), (True, False)]
    try:
        for cc in archs:
            driver.set_active(StandInDriver(cc))
            for autotune, is_default in passes:
                triton_configs.set_autotune(autotune)
                for dtype_name in dtypes:
                    matmul.fp32_precision = "tf32" if dtype_name == "tf32" else "ieee"
                    recorder.context = dict(arch=f"sm_{cc}", dtype=dtype_name, default=is_default)
                    print(f"sm_{cc} {dtype_name} autotune={autotune}", file=sys.stderr, flush=True)
                    for case in _cases(quick):
                        if autotune and case["n"] != 256:
                            continue  # the space does not depend on N
                        before = len(recorder.failures)
                        try:
                            _drive(dtype_name, case, quick)
                        except Exception as exc:
                            if len(recorder.failures) == before:  # not a compile error
                                recorder.failures.append(
                                    f"driving {dtype_name} {case}: {type(exc).__name__}: {exc}"
                                )
    finally:
        with contextlib.suppress(RuntimeError):  # no real driver on a machine without a GPU
            driver.reset_active()
        triton_configs.set_autotune(False)
        matmul.fp32_precision = "none"
    missing = {fn for fn in kernels - _reachable(recorder.launched) if recorder.wanted(fn)}
    for fn in sorted(missing, key=lambda f: (f.__module__, f.__name__)):
        recorder.failures.append(
            f"{fn.__module__}.{fn.__name__}: never launched by the dispatch driver (add a case)"
        )
    return recorder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma list, e.g. sm_80,sm_90")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/triton-aot"))
    parser.add_argument("--dump-ptx", action="store_true", help="also write DIR/ptx/*.ptx")
    parser.add_argument("--quick", action="store_true", help="default configs, largest variant")
    parser.add_argument("--jobs", type=int, default=2, help="architectures compiled in parallel")
    parser.add_argument("--only", help="regex on module.function: compile only those kernels")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma list of " + "/".join(DTYPES)
    )
    parser.add_argument("--from-csv", help="only rewrite the reports from this triton-aot.csv")
    args = parser.parse_args(argv)
    archs = []
    for item in args.arch.split(","):
        match = re.fullmatch(r"sm_?(\d{2,3})", item.strip())
        if not match:
            parser.error(f"--arch: expected names like sm_80,sm_90, got {item!r}")
        archs.append(int(match.group(1)))
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"--dtypes: expected some of {','.join(DTYPES)}, got {unknown}")
    if args.only:
        try:
            re.compile(args.only)
        except re.error as exc:
            parser.error(f"--only: not a regular expression ({exc}): {args.only!r}")
    if args.from_csv:
        recorder = Recorder()
        recorder.rows = read_csv(Path(args.from_csv))
        write_reports(recorder.rows, {}, Path(args.out), False, archs)
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive count, got {args.jobs}")
    if args.jobs > 1 and len(archs) > 1:
        return _parallel(args, archs)
    recorder = compile_all(archs, args.quick, args.only, dtypes)
    write_reports(recorder.rows, recorder.ptx, Path(args.out), args.dump_ptx, archs)
    print(f"{len(recorder.rows)} kernels compiled -> {args.out}/triton-aot.{{csv,md}}")
    for msg in recorder.failures:
        print("FAILED:", msg, file=sys.stderr)
    return 1 if recorder.failures else 0


def _parallel(args, archs) -> int:
    """One subprocess per architecture (at most --jobs at a time), then one merged report."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    out = Path(args.out)
    parts = {cc: out / "parts" / f"sm_{cc}" for cc in archs}

    def one(cc):
        cmd = [sys.executable, __file__, "--arch", f"sm_{cc}", "--out", str(parts[cc])]
        cmd += ["--dump-ptx"] * args.dump_ptx + ["--quick"] * args.quick
        cmd += ["--dtypes", args.dtypes] + (["--only", args.only] if args.only else [])
        return subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, archs))
    recorder = Recorder()
    for cc, run in zip(archs, runs, strict=True):
        sys.stderr.write(run.stderr)
        if not (parts[cc] / "triton-aot.csv").exists():
            print(f"FAILED: sm_{cc}: the compile process wrote no report", file=sys.stderr)
            continue
        recorder.rows += read_csv(parts[cc] / "triton-aot.csv")
        if args.dump_ptx:
            for ptx in (parts[cc] / "ptx").glob("*.ptx"):
                recorder.ptx[ptx.stem] = ptx.read_text()
    write_reports(recorder.rows, recorder.ptx, out, args.dump_ptx, archs)
    for cc in archs:
        for path in sorted(parts[cc].rglob("*"), reverse=True) if parts[cc].exists() else []:
            path.rmdir() if path.is_dir() else path.unlink()
        if parts[cc].exists():
            parts[cc].rmdir()
    (out / "parts").rmdir()
    print(f"{len(recorder.rows)} kernels compiled -> {out}/triton-aot.{{csv,md}}")
    return max(run.returncode for run in runs)


if __name__ == "__main__":
    sys.exit(main())
