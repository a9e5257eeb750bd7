"""The ``linear_divergence`` Triton kernels compile for sm_80 and sm_90 without a GPU
(Triton's bundled ptxas, docs/design.md §8) at the launch configuration the dispatcher picks on a
GPU, fit shared memory, and fp32 inputs run full-precision dots (no TF32 in the PTX).

Compilation runs in a subprocess without ``TRITON_INTERPRET`` (the kernel conftest turns
the interpreter on for this process, and interpreted kernels cannot be compiled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sgsd_kernels.ops.triton_backend import linear_divergence as m

    name, ptr, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kernel = getattr(m, name)
    import torch
    cfg = m._config({"*fp32": torch.float32, "*bf16": torch.bfloat16}[ptr])
    constexprs = dict(HAS_BIAS=True, HAS_TBIAS=True, BETA_MODE=2, HAS_CLIP=True,
                      UPCAST=False, PRECISION="ieee", ACC=tl.float32,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"])
    floats = ("inv_t", "beta", "log_beta", "log_1m_beta", "clip")
    sig = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in floats:
            sig[arg] = "fp32"
        elif arg == "r0":
            sig[arg] = "i64"
        elif arg in ("N", "V", "H", "R") or arg.startswith("stride"):
            sig[arg] = "i32"
        elif arg in ("Out", "Stats", "G", "Grad"):
            sig[arg] = "*fp32"
        else:
            sig[arg] = ptr
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", cap, 32), options=opts)
    ptx = k.asm["ptx"]
    print(json.dumps({"shared": k.metadata.shared, "mma": "mma" in ptx, "tf32": "tf32" in ptx}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype_ptr", ["*fp32", "*bf16"])
@pytest.mark.parametrize("name", ["_fwd_kernel", "_grad_kernel"])
def test_kernels_compile_for_ampere_and_hopper(name, dtype_ptr, capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, name, dtype_ptr, str(capability)],
        capture_output=True, text=True, timeout=600, env=env, check=True,
    )  # fmt: skip
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["shared"] <= SHARED_LIMIT[capability]
    if dtype_ptr == "*fp32":  # full-precision fp32 dots lower to FMAs, not TF32 mma
        assert not info["tf32"], "fp32 inputs must not silently run as TF32"
    else:
        assert info["mma"], "bf16 dots must run on the tensor cores (mma / wgmma)"
