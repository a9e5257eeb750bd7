"""The ``native`` backend: C++ CPU kernels from ``sgsd_kernels/csrc`` (built and loaded by
``sgsd_kernels.native``) for the linear log-prob op and the local-support op; the other
ops' modules re-export the torch backend's functions (their cost is not a GEMM)."""
