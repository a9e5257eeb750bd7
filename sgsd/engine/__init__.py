"""What the training loop (:mod:`sgsd.train`) drives, one concern per module.

* :mod:`sgsd.engine.distributed`     -- rank layout from torchrun's environment, seeding
* :mod:`sgsd.engine.model`           -- the policy (+ LoRA): hidden states, LM head, DDP/FSDP2
* :mod:`sgsd.engine.rollout`         -- rollout engines: vLLM in process, or HF ``generate``
* :mod:`sgsd.engine.problems`        -- the problems a run trains on, and their order
* :mod:`sgsd.engine.scoring`         -- rollouts, teacher log-probs, micro-batched fwd/bwd
* :mod:`sgsd.engine.teacher_hidden`  -- teacher hidden states (OPSD, local support)
* :mod:`sgsd.engine.teacher_weights` -- which weights the teachers score with
* :mod:`sgsd.engine.optim`           -- AdamW and the learning-rate schedule
* :mod:`sgsd.engine.checkpoint`      -- atomic checkpoints, exact resume, graceful stop
* :mod:`sgsd.engine.rundir`          -- one run per output directory: fresh / resume / overwrite

The engine never imports the loop, the command line or the evaluator.
"""
