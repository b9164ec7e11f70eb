"""The training loop: sample -> score -> advantages -> update -> log, one step at a time.

Everything the loop calls is built from the configuration by :mod:`seqpg.training.build`; the maths
is the core's (:mod:`seqpg.core`), chosen by name from the algorithm family's row in
:mod:`seqpg.algorithms`.  Checkpoints hold weights, optimizer, RNG streams, the prompt
stream's position and the KL controller, so ``seqpg train --resume RUN`` continues exactly.

The same loop runs in every process of a ``torchrun`` launch (:mod:`seqpg.training.distributed`).
Each step takes the next ``prompts_per_step`` prompts of the stream (the same on every
process) and each process samples and scores its own consecutive share of them, so a
prompt's group of samples stays on one process; batch statistics, loss normalisers,
gradients and metrics are summed over processes.  Only rank 0 writes the run directory.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import core
from ..batch import Prompt
from .build import Components, build_components
from ..rundir.checkpoint import checkpoint_to_resume
from ..rundir.checkpoint_files import capture_rng_state, restore_rng_state
from ..rundir.parallel_checkpoint import load_parallel_checkpoint, save_parallel_checkpoint
from ..config import TrainConfig, to_dict
from .collapse import CollapseWatch, collapse_metrics
from .dynamic import Draw, fill_batch
from .distributed import DistContext, failed_together
from .periodic_eval import evaluate_held_out
from ..rundir.resume import apply_resume_changes, record_resume_changes, resume_changes
from ..rundir.runlock import RunLock
from ..rundir.runlog import RunLogger, Timer, progress_bar
from ..rewards.scorers import reward_metrics, sample_scores
from ..rundir.signals import StopFlag
from .step import judge, sample, score
from .update import refuse_nonfinite_parameters, update


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    stopped_early: bool
    final_metrics: dict[str, float]
    out_of_time: bool = False
    """It stopped because ``max_minutes`` were reached (and no stop signal came): what was asked."""


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as configured; with ``resume`` continue from the run directory's latest checkpoint.

    Under ``torchrun`` every process calls this; it joins (and at the end leaves) the process group.
    """
    dist = DistContext.from_env(cfg.device, cfg.dist_backend, cfg.dist_timeout_s)
    try:
        return _train(cfg, dist, resume, progress)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: DistContext, resume: bool, progress: bool) -> TrainResult:
    run_dir = Path(cfg.run_dir)
    with ExitStack() as held:
        with dist.fail_together("locking the run directory"):
            if dist.is_main:  # before anything is written there; released on any exit
                held.enter_context(RunLock(run_dir))
        return _run(cfg, dist, resume, progress, run_dir)


def _run(cfg: TrainConfig, dist: DistContext, resume: bool, progress: bool, run_dir: Path) -> TrainResult:
    changes = resume_changes(run_dir, cfg) if resume else {}  # refuses what cannot change mid-run
    c: Components = build_components(cfg, dist)  # scorers and prompts first, then models
    start = 0
    with dist.fail_together("resume"):
        ckpt = checkpoint_to_resume(run_dir, resume)
        if ckpt is not None:
            state = load_parallel_checkpoint(c.parallel, ckpt, c.optimizer, c.scheduler, verify=False)  # verified
            start = state["step"]
            c.stream.load_state_dict(state["prompt_stream"])
            c.kl_ctl.load_state_dict(state["kl_controller"])
            apply_resume_changes(changes, cfg, c.optimizer, c.scheduler, c.kl_ctl)  # overrides win over the restore
        log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                        resume_step=start if ckpt is not None else None)
        log.write_config(to_dict(cfg))
        if dist.is_main:
            record_resume_changes(run_dir, start + 1, changes)
    stop = StopFlag()
    t_start, metrics, step, saved, signalled, timed_out = time.monotonic(), {}, start, start, False, False
    bar = progress_bar(total=cfg.steps, initial=start, enabled=progress and dist.is_main)
    watch = CollapseWatch(cfg.collapse_steps, cfg.collapse_min_distinct, cfg.collapse_shared_opening)
    try:
        with stop:
            if start == 0:
                evaluate_held_out(cfg, c, dist, 0, log)  # the starting point of the held-out curve
            for step in range(start + 1, cfg.steps + 1):
                before = StepStart.capture(c)
                try:
                    metrics = train_step(cfg, c, dist, step, log, before)
                except Exception as e:
                    _save_after_failed_step(cfg, c, dist, step, saved, before, e)
                    raise
                evaluate_held_out(cfg, c, dist, step, log)  # when due; outside the step's timers and RNG streams
                bar.update(metrics)
                warning = watch.update(step, metrics)
                if warning and dist.is_main:
                    bar.warn(warning)
                    log.log_warning(step, warning)
                out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes
                asked = torch.tensor([stop.is_set(), out_of_time, stop.take_checkpoint_request()], dtype=torch.int64)
                signalled, timed_out, save_now = dist.all_reduce_max(asked).tolist()  # every process stops / saves
                halt = signalled or timed_out                                          # after this step
                if step % cfg.save_every == 0 or step == cfg.steps or halt or save_now:
                    _save(cfg, c, dist, step)
                    saved = step
                if halt:
                    break
    finally:  # also on an error: the logs are closed and the plots written
        bar.close()
        log.close()
    return TrainResult(run_dir, step, step < cfg.steps, metrics, out_of_time=bool(timed_out and not signalled))


@dataclass
class StepStart:
    """Where the run stood before a step: what the step consumes before it changes the model.

    A step that fails before its update has changed only the prompt stream's position and the
    RNG streams; :meth:`rewind` puts them back, so the run's state is again exactly that of the
    end of the previous step.  ``train_step`` sets ``updating`` just before the update, from
    which point on the model and optimizer may have changed.
    """

    stream: dict[str, Any]
    rng: dict[str, Any]
    updating: bool = False

    @classmethod
    def capture(cls, c: Components) -> "StepStart":
        return cls(c.stream.state_dict(), capture_rng_state())

    def rewind(self, c: Components) -> None:
        c.stream.load_state_dict(self.stream)
        restore_rng_state(self.rng)


def _save_after_failed_step(cfg: TrainConfig, c: Components, dist: DistContext, step: int, saved: int,
                            before: StepStart, error: Exception) -> None:
    """Step ``step`` raised: save the last complete step unless saved already or the state is not clean.

    Clean means the step failed before its update (sampling, scoring, the reference pass, the
    advantages) and, under torchrun, on every process at the same point (``fail_together``), so
    all of them can still save together.  A failure of the save is added to ``error``'s notes.
    """
    last = step - 1
    why_not = ("no step has completed since the last checkpoint" if last <= saved
               else "it failed during the update, which may have changed the model in part" if before.updating
               else "it failed on this process alone" if not failed_together(error, dist) else None)
    if why_not is None:
        before.rewind(c)
        try:
            _save(cfg, c, dist, last)
        except Exception as save_error:  # noqa: BLE001 -- the step's error is the one to raise
            error.add_note(f"seqpg: saving the checkpoint of step {last} failed too: {save_error!r}")
            return
    if dist.is_main:
        told = (f"saved the checkpoint of step {last}, the last complete step" if why_not is None
                else f"no checkpoint saved: {why_not}" + (f" (the newest is of step {saved})" if saved else ""))
        print(f"seqpg: step {step} failed; {told}", file=sys.stderr, flush=True)


def train_step(cfg: TrainConfig, c: Components, dist: DistContext, step: int, log: RunLogger,
               start: StepStart | None = None) -> dict[str, float]:
    """One step: sample -> score -> judge (reference, KL, advantages) -> update -> log; its metrics.

    The stages are :mod:`seqpg.training.step`'s, over the settings decided once (``c.settings``).
    ``start`` (if given) is told when the update begins (``start.updating``).
    """
    st, timer, n_prompts = c.settings, Timer(), cfg.sampling.prompts_per_step

    def draw(round_: int) -> Draw:  # more than one per step only with dynamic sampling (seqpg.training.dynamic)
        prompts, first = _my_share(c.stream.take(n_prompts), dist)
        with timer("sample"):
            rollout = sample(model, c.tokenizer, prompts, st, step=step, first=first + round_ * n_prompts,
                             device=dist.device, rank=dist.rank if dist.enabled else None)
        with timer("score"):
            return Draw(prompts, rollout, score(model, c.tokenizer, rollout, prompts, c.scorers, st))

    with c.parallel.full_params() as model, dist.fail_together("sampling and scoring"), st.autocast(dist.device):
        drawn, dynamic_metrics = fill_batch(draw, n_prompts // dist.world_size, st.sample_rounds,
                                            c.tokenizer.pad_token_id)
    rollout, scored = drawn.rollout, drawn.scored
    with st.autocast(dist.device):
        judged = judge(rollout, scored, st, kl_coef=c.kl_ctl.value, reference=c.reference, critic=c.critic,
                       all_reduce=dist.all_reduce_sum, timer=timer, policy=c.policy)
    if start is not None:
        start.updating = True
    with timer("update"):
        ustats = update(c.policy, c.optimizer, judged.train_batch(rollout, st), st.update,
                        kl_loss_coef=judged.kl_loss_coef(st), critic=c.critic, all_reduce=dist.all_reduce_sum,
                        max_len=st.max_completion_tokens, grad_sync=c.parallel)
    c.scheduler.step()
    mask_BC, kl_BC = rollout.completion_mask_BC, judged.kl_BC
    kl_mean = float(core.masked_mean(kl_BC, mask_BC, all_reduce=dist.all_reduce_sum)) if kl_BC is not None else 0.0
    c.kl_ctl.update(kl_mean, rollout.batch_size * dist.world_size)
    metrics = {**_metrics(scored.batch, judged.advantages_BC, kl_mean, ustats, timer, c, dist), **dynamic_metrics}
    metrics["adv_task_abs_max"] = float(dist.all_reduce_max(torch.tensor(judged.task_adv_abs_max)))
    if judged.sampler is not None:
        metrics.update(_mismatch_metrics(judged.sampler.stats, dist))
    if judged.in_loss_B is not None:
        metrics["overlong_masked"] = float(dist.gather_cat((~judged.in_loss_B).float()).mean())
    log.log_metrics(step, metrics)
    if step % cfg.log_samples_every == 0:
        rows = _sample_rows(scored.batch, judged.advantages_BC, st.rollouts)
        log.log_samples(step, [row for rows in dist.gather_objects(rows) for row in rows])
    return metrics


def _my_share(prompts: list[Prompt], dist: DistContext) -> tuple[list[Prompt], int]:
    """This process's consecutive share of the step's prompts, and the index of its first one."""
    k = len(prompts) // dist.world_size
    return prompts[dist.rank * k:(dist.rank + 1) * k], dist.rank * k


def _metrics(scored, adv_BC, kl_mean, ustats, timer, c: Components, dist: DistContext) -> dict[str, float]:
    """The step's metrics over all processes (``ustats`` come global from ``update``)."""
    r, rollouts = scored.rollout, c.settings.rollouts
    mask = r.completion_mask_BC
    rewards = dist.gather_cat(rollouts.reported_rewards(scored))  # episodes: the environment's rewards too
    lengths = dist.gather_cat(r.completion_lengths_B.float())
    m = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0}
    m.update(reward_metrics(scored, dist.gather_cat))
    if scored.correct_B is not None:
        m["accuracy"] = float(dist.gather_cat(scored.correct_B.float()).mean())
    m["adv_mean"] = float(core.masked_mean(adv_BC, mask, all_reduce=dist.all_reduce_sum))
    m["adv_std"] = float(core.masked_var(adv_BC, mask, all_reduce=dist.all_reduce_sum).sqrt())
    m["adv_abs_max"] = float(dist.all_reduce_max((adv_BC.abs() * mask).max()))
    m["kl"], m["kl_coef"] = kl_mean, c.kl_ctl.value
    m.update(ustats)
    m["response_length"] = float(lengths.mean())
    m["truncated_frac"] = float(dist.gather_cat((~r.finished_B).float()).mean())
    m["scorer_errors"] = float(dist.all_reduce_sum(torch.tensor(float(scored.num_scorer_errors))))
    m["lr"] = c.optimizer.param_groups[0]["lr"]
    m.update(rollouts.metrics(r, dist.gather_cat, dist.all_reduce_sum))
    groups = dist.gather_cat(r.group_ids_B + dist.rank * (int(r.group_ids_B.max()) + 1))  # distinct across processes
    m.update(collapse_metrics(rewards, groups, [t for ts in dist.gather_objects(r.completions) for t in ts],
                              openings=rollouts.shared_openings))
    seconds = dist.all_reduce_max(torch.tensor(list(timer.seconds.values()), dtype=torch.float64)).tolist()
    m.update({f"time/{k}": v for k, v in zip(timer.seconds, seconds)})  # the slowest process's
    total = sum(seconds)
    m["time/step"] = total
    m["tokens_per_s"] = float(lengths.sum()) / max(total, 1e-9)
    return m


def _mismatch_metrics(stats: core.MismatchStats, dist: DistContext) -> dict[str, float]:
    """``mismatch/*`` over all processes: the sums summed, the largest difference the largest."""
    sums = dist.all_reduce_sum(torch.stack([stats.num_tokens, stats.kl_sum, stats.log_ratio_sum,
                                            stats.truncated_sum]).double())
    top = dist.all_reduce_max(stats.max_abs_log_ratio.double())
    return core.MismatchStats(*sums, max_abs_log_ratio=top).means()


def _sample_rows(scored, adv_BC, rollouts) -> list[dict]:
    r = scored.rollout
    returns_B = rollouts.reported_rewards(scored)
    rows = []
    for i in range(r.batch_size):
        mask_C = r.completion_mask_BC[i]
        n = int(mask_C.sum())
        rows.append({"prompt_id": r.prompts[i].id, "prompt": r.prompts[i].text, "completion": r.completions[i],
                     "reward": float(returns_B[i]),
                     "scores": sample_scores(scored, i),
                     "advantage": float(adv_BC[i][mask_C].mean()) if n else 0.0, "length": n,
                     **rollouts.log_row(r, i)})
    return rows


def _save(cfg: TrainConfig, c: Components, dist: DistContext, step: int) -> None:
    """Every process calls this: rank 0 writes the whole model (DDP, one process), or each process
    its own shards (FSDP2)."""
    state = {"step": step, "prompt_stream": c.stream.state_dict(), "kl_controller": c.kl_ctl.state_dict()}
    with dist.fail_together("checkpoint"):
        refuse_nonfinite_parameters({"policy": c.policy, **c.extra_modules}, step)  # never save a NaN model
    save_parallel_checkpoint(c.parallel, cfg.run_dir, step, c.optimizer, trainer_state=state, scheduler=c.scheduler,
                             keep_last=cfg.keep_checkpoints, tokenizer=c.tokenizer)
