"""seqpg: policy-gradient reinforcement learning for language models.

The maths core is re-exported here flat (``seqpg.token_logprobs``, ``seqpg.compute_advantages``,
...). Importing ``seqpg`` imports torch and the core only; the model, sampling and training
modules (which need transformers) load when imported by name.  The packages follow the step:

    seqpg.core       the maths (tensors in, tensors out)
    seqpg.model      loading models, the trainer's log-prob layout
    seqpg.rollout    sampling, the fast decoder, multi-turn episodes
    seqpg.rewards    prompt sources and scorers
    seqpg.training   the loop, its stages, update, reference, critic, processes
    seqpg.rundir     the run directory: checkpoints, lock, signals, resume, logs, plots
    seqpg.sft        supervised fine-tuning on demonstrations: the update with advantage 1
    seqpg.apps       the command line, demo, explain, eval, export, bench
"""

from .core import *  # noqa: F401,F403  (the public core API, listed in seqpg.core.__all__)
from .core import __all__ as _core_all


__version__ = "0.1.0"
__all__ = ["__version__", *_core_all]
