"""Build hook for sgsd-kernels.

Metadata lives in pyproject.toml. Nothing is compiled at install time: the native CPU
kernels (docs/design.md §5, the "native" backend) ship as C++ sources inside the package
(``sgsd_kernels/csrc/``, declared as package data) and are compiled on first use, or by
``python -m sgsd_kernels.native build``, with ``torch.utils.cpp_extension`` and ninja
into a per-user cache (``$SGSD_CACHE`` or ``~/.cache/sgsd_kernels``). So installing needs
neither a compiler nor a torch inside pip's isolated build environment; without a
compiler the package runs on the ``torch`` backend and ``backend="native"`` says what is
missing.
"""

from setuptools import setup

setup()
