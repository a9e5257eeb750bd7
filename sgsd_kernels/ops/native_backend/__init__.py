"""The ``native`` backend: C++ CPU kernels from ``sgsd_kernels/csrc`` (built and loaded by
``sgsd_kernels.native``)."""
