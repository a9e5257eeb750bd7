"""Set up before any test module is imported.

Without a GPU the Triton kernels run in Triton's CPU interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel module is imported, and test modules of every folder
import the library (the benchmark and trainer tests too), so the variable is set here, in
the conftest pytest loads first, not in ``tests/kernels/conftest.py`` alone: with
``pytest tests`` the subfolders' conftests load only when collection reaches them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
