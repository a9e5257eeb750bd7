"""Training methods: what the loss is made of, one file per method.

* :mod:`sgsd.methods.base`          -- the strategy interface the trainer's step calls
* :mod:`sgsd.methods.sgsd`          -- SGSD: K skill-conditioned teachers, the gated loss
* :mod:`sgsd.methods.local_support` -- SGSD with the top-k local support gate
* :mod:`sgsd.methods.grpo`          -- GRPO: group-normalised advantages, PPO clip
* :mod:`sgsd.methods.opsd`          -- OPSD: a fixed teacher that sees the reference
* :mod:`sgsd.methods.registry`      -- ``--loss NAME`` -> strategy

The registrations below are the list of methods: a new one is a file plus one line here.
Importing this package imports no torch (the factories load when a run builds them).
"""

from sgsd.methods.registry import METHODS, Method, build_method, method_names, register_method

__all__ = ["METHODS", "Method", "build_method", "method_names", "register_method"]

register_method(
    "sgsd",
    "sgsd.methods.sgsd:SGSDLoss",
    summary="skill-conditioned gated self-distillation (with --local-support-top-k: the "
    "top-k local support gate)",
    variants={"local_support_top_k": "sgsd.methods.local_support:LocalSupportSGSDLoss"},
)
register_method(
    "grpo",
    "sgsd.methods.grpo:GRPOLoss",
    summary="group relative policy optimisation, no teachers",
    # The published GRPO settings: G = 8 rollouts at temperature 1.2, two optimiser passes.
    defaults={"rollouts_per_problem": 8, "temperature": 1.2, "num_iterations": 2},
)
register_method(
    "opsd",
    "sgsd.methods.opsd:OPSDLoss",
    summary="on-policy self-distillation from a fixed teacher that sees the reference",
)
