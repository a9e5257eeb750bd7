"""Peak memory of the torch path of ``linear_divergence`` and of the local-support loss,
measured for real in a fresh subprocess (as in test_memory.py): nothing proportional to
N×V is allocated, while the materialising reference holds several N×V tensors."""

from __future__ import annotations

import textwrap

import pytest

from .test_memory import MEASURE, PRELUDE, run_peak_script

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
    return run_peak_script(SCRIPT, workload, backend, n, V, H)


def flat_peaks(workload, backend, max_fraction_of_nv):
    """Measure ``backend``'s peak at N_SMALL and N_BIG (best of two runs each: a stray first
    touch of allocator arenas can only inflate RSS, seen as +43 MiB once with other jobs on
    the 2-core box, never deflate it) and assert it does not grow like N×V and stays under
    ``max_fraction_of_nv`` of one fp32 N_BIG×V tensor. Returns the N_BIG peak."""
    one_nv = N_BIG * V * 4
    small = min(_peak(workload, backend, N_SMALL) for _ in range(2))
    big = min(_peak(workload, backend, N_BIG) for _ in range(2))
    growth = big - small
    assert growth < (N_BIG - N_SMALL) * V * 4 / 8, f"grew {mib(growth)}: {mib(small)}->{mib(big)}"
    assert big < one_nv * max_fraction_of_nv, f"{backend} peak {mib(big)}"
    return big


def mib(b):
    return f"{b / 2**20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["divergence", "local_support"])
def test_torch_path_allocates_nothing_proportional_to_n_times_v(workload):
    big = flat_peaks(workload, "torch", 1 / 2)
    reference = _peak(workload, "reference", N_BIG)
    assert reference > N_BIG * V * 4, f"reference peak {mib(reference)} too small to prove anything"
    assert reference / max(big, 1) >= 8, f"reference {mib(reference)} vs ours {mib(big)}"
