"""Trainer integrations over the public functions and ``sgsd_kernels.hf``.

Each module imports its framework at import time: ``sgsd_kernels.integrations.trl`` needs
``trl`` (the ``trl`` extra). See docs/integrations.md.
"""
