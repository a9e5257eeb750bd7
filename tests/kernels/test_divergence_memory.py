"""Peak memory of the torch path of ``linear_divergence`` and of the local-support loss,
measured for real in a fresh subprocess (as in test_memory.py): nothing proportional to
N×V is allocated, while the materialising reference holds several N×V tensors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .test_memory import MEASURE, PRELUDE

V, H = 32768, 64
N_SMALL, N_BIG = 1024, 4096  # as test_memory: the growth bound then sits well above allocator noise

SCRIPT = (
    PRELUDE
    + textwrap.dedent(
        """

    torch.manual_seed(0)
    workload, backend, N, V, H = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    h = (torch.randn(N, H) * 0.5).requires_grad_()
    w = (torch.randn(V, H) * 0.1).requires_grad_()
    th = torch.randn(N, H) * 0.5
    t = torch.randint(0, V, (N,))

    def run(n):
        if workload == "divergence":
            loss = sk.linear_divergence(h[:n], w, th[:n], beta=0.5, elementwise_clip=0.05,
                                        backend=backend).sum()
        else:
            loss = sk.linear_gated_kd_loss(
                h[:n].view(1, n, H), w, t[:n].view(1, n), torch.ones(1, n, dtype=torch.bool),
                torch.ones(1), torch.ones(1, 1), teacher_hidden=th[:n].view(1, 1, n, H),
                local_support_top_k=100, confidence_threshold=0.0, backend=backend).loss
        loss.backward()

    """
    )
    + MEASURE
)


def _peak(workload, backend, n):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, workload, backend, str(n), str(V), str(H)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["delta"]


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["divergence", "local_support"])
def test_torch_path_allocates_nothing_proportional_to_n_times_v(workload):
    one_nv = N_BIG * V * 4  # one fp32 N×V tensor
    # Best of two runs: a stray first touch of allocator arenas can only inflate RSS
    # (seen as +43 MiB once with other jobs on the 2-core box), never deflate it.
    small = min(_peak(workload, "torch", N_SMALL), _peak(workload, "torch", N_SMALL))
    big = min(_peak(workload, "torch", N_BIG), _peak(workload, "torch", N_BIG))
    reference = _peak(workload, "reference", N_BIG)
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    assert reference > one_nv, f"reference peak {mib(reference)} too small to prove anything"
    growth = big - small
    assert growth < (N_BIG - N_SMALL) * V * 4 / 8, f"grew {mib(growth)}: {mib(small)}->{mib(big)}"
    assert big < one_nv / 2, f"torch path peak {mib(big)}"
    assert reference / max(big, 1) >= 8, f"reference {mib(reference)} vs ours {mib(big)}"
