"""Evaluation (docs/evaluation.md).

* :mod:`sgsd.eval.verify`          -- the verifier: +1 / -1 for a completion (math-verify)
* :mod:`sgsd.eval.verify_worker`   -- its capped worker process (the only one importing sympy)
* :mod:`sgsd.eval.metrics`         -- avg@n (with a 95% interval), pass@n, maj@n
* :mod:`sgsd.eval.evaluator`       -- the evaluation command (``python -m sgsd.evaluate``)
* :mod:`sgsd.eval.during_training` -- evaluation every ``eval_every`` steps inside a run

The verifier and the metrics are leaves (they import nothing of ``sgsd``); the evaluator
drives the engine's model loading and rollouts.
"""
