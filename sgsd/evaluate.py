"""``python -m sgsd.evaluate``: the evaluation command (:mod:`sgsd.eval.evaluator`)."""

if __name__ == "__main__":
    from sgsd.eval.evaluator import main

    raise SystemExit(main())
