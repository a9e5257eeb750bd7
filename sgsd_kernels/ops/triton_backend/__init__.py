"""The ``triton`` backend: fused Triton kernels and their host-side launchers, one module
per op. Imported lazily by ``sgsd_kernels.ops.<op>`` so that the package works without
Triton."""
