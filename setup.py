"""Build hook for sgsd-kernels.

Metadata lives in pyproject.toml. This file exists for the optional native CPU
extension in `csrc/` (DESIGN §5, "native" backend), which will be added here as an
optional `Extension` whose build failure never breaks the install: the package falls
back to the `torch` backend when the extension is absent. Nothing is compiled yet.
"""

from setuptools import setup

setup()
