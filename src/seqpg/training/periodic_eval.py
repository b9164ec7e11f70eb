"""Held-out evaluation while training: every ``eval_every`` steps, before the first and after the last.

At each of those steps the policy is evaluated on the first ``eval_prompts`` held-out prompts by the
function ``seqpg eval`` uses (``evaluate.evaluate_as_configured``: one greedy completion per prompt with
the run's sampling settings), and ``eval/*`` metrics are logged at that step to ``metrics.jsonl`` (a line
of their own) and TensorBoard; ``plots/eval.png`` draws them. So the numbers logged at step k are the
ones ``seqpg eval RUN`` prints for the checkpoint of step k (in float32; tested).

It happens between steps, outside the step's timers (``time/step`` and ``tokens_per_s`` never include
it; its own seconds go to ``time/eval``). It leaves training exactly as it was: it reads no prompt from
the training stream, and every random stream it could touch (Python's, NumPy's, torch's CPU and CUDA
generators) is restored afterwards, so a run with evaluation trains exactly like one without, and a
resumed run like an uninterrupted one (tested).

Under ``torchrun`` every process evaluates all the prompts (the same greedy completions) and rank 0
logs them: the simplest way that stays correct under FSDP2, whose parameters every process must
gather together.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from .evaluate import EvalResult, evaluate_as_configured
from ..rundir.checkpoint_files import capture_rng_state, restore_rng_state


def due(step: int, eval_every: int, last_step: int) -> bool:
    """Whether the held-out evaluation runs after ``step`` (0: before training)."""
    return eval_every > 0 and (step % eval_every == 0 or step == last_step)


def eval_metrics(result: EvalResult, seconds: float) -> dict[str, float]:
    """The ``eval/*`` metrics of one evaluation that took ``seconds`` (accuracy only where a scorer defines
    correctness)."""
    m = {"eval/reward_mean": result.mean_reward, "eval/reward_se": result.se_reward,
         "eval/response_length": result.mean_length, "eval/prompts": result.n_prompts, "time/eval": seconds}
    if result.accuracy is not None:
        m["eval/accuracy"], m["eval/accuracy_se"] = result.accuracy, result.se_accuracy
    m.update({f"eval/scorer/{name}": v for name, v in result.per_scorer.items()})
    return m


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Every global random stream (Python's, NumPy's, torch's CPU and CUDA / MPS) restored on exit: the same
    states a checkpoint saves (:func:`~seqpg.rundir.checkpoint_files.capture_rng_state`)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def evaluate_held_out(cfg, c, dist, step: int, log) -> dict[str, float] | None:
    """Evaluate and log at ``step`` when it is due (see :func:`due`); the metrics, or None when not due.

    ``cfg``: the run's ``TrainConfig``; ``c``: its ``build.Components``; ``dist``: its ``DistContext``;
    ``log``: its ``RunLogger``.
    """
    if not due(step, cfg.eval_every, cfg.steps):
        return None
    prompts = c.eval_prompts[:cfg.eval_prompts]
    t0 = time.perf_counter()
    with preserved_rng(), c.parallel.full_params() as model, dist.fail_together("held-out evaluation"):
        result = evaluate_as_configured(cfg, model, c.tokenizer, prompts, c.scorers, rollouts=c.settings.rollouts)
    metrics = eval_metrics(result, time.perf_counter() - t0)
    log.log_metrics(step, metrics)
    return metrics
