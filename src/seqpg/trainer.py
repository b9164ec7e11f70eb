"""The training loop: sample -> score -> advantages -> update -> log, one step at a time.

Everything the loop calls is built from the configuration by :mod:`seqpg.build`; the maths
is the core's (:mod:`seqpg.core`), chosen by name from the algorithm family's row in
:mod:`seqpg.algorithms`.  Checkpoints hold weights, optimizer, RNG streams, the prompt
stream's position and the KL controller, so ``seqpg train --resume RUN`` continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import core
from .batch import total_rewards
from .build import Components, build_components
from .checkpoint import StopFlag, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, to_dict
from .distributed import DistContext
from .runlog import RunLogger, Timer, progress_bar
from .sampling import generate
from .scorers import score_batch
from .update import TrainBatch, update


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    stopped_early: bool
    final_metrics: dict[str, float]


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as configured; with ``resume`` continue from the run directory's latest checkpoint."""
    dist = DistContext.from_env(cfg.device)
    run_dir = Path(cfg.run_dir)
    c: Components = build_components(cfg, dist)  # scorers and prompts first, then models
    start, state = 0, {}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints; start without --resume")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=dist.unwrap(c.policy), optimizer=c.optimizer,
                                extra_modules=c.extra_modules, scheduler=c.scheduler)
        start = state["step"]
        c.stream.load_state_dict(state["prompt_stream"])
        c.kl_ctl.load_state_dict(state["kl_controller"])
    log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                    resume_step=start if ckpt is not None else None)
    log.write_config(to_dict(cfg))
    stop = StopFlag()
    t_start, metrics, step = time.monotonic(), {}, start
    bar = progress_bar(total=cfg.steps, initial=start, enabled=progress and dist.is_main)
    with stop:
        for step in range(start + 1, cfg.steps + 1):
            metrics = train_step(cfg, c, dist, step, log)
            bar.update(metrics)
            out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes
            if step % cfg.save_every == 0 or step == cfg.steps or stop.is_set() or out_of_time:
                _save(cfg, c, dist, step)
            if stop.is_set() or out_of_time:
                break
    bar.close()
    log.close()
    return TrainResult(run_dir, step, step < cfg.steps, metrics)


def train_step(cfg: TrainConfig, c: Components, dist: DistContext, step: int, log: RunLogger) -> dict[str, float]:
    """One step: sample -> score -> advantages -> update -> log. Returns the step's metrics."""
    s, a, timer = cfg.sampling, cfg.algo, Timer()
    prompts = c.stream.take(s.prompts_per_step * dist.world_size)[dist.rank::dist.world_size]
    with timer("sample"):
        rollout = generate(c.policy, c.tokenizer, prompts, n=s.samples_per_prompt, **c.sample_kwargs)
    with timer("score"):
        scored = score_batch(rollout, c.scorers, on_error=cfg.on_scorer_error, tokenizer=c.tokenizer)
        adv_params = dict(a.advantage_params, **c.family_params)
        if c.family.greedy_baseline:
            adv_params["baseline"] = _greedy_baseline(c, prompts, rollout)
    mask_BC = rollout.completion_mask_BC
    old_logprobs_BC = rollout.sample_logprobs_BC
    with timer("reference"):
        ref_BC = c.reference.logprobs(rollout, temperature=s.temperature) if c.reference is not None else None
        old_values_BC = c.critic.values_of(rollout) if c.critic is not None else None
    rewards = total_rewards(scored)
    kl_BC = core.kl_estimate(a.kl_estimator, old_logprobs_BC, ref_BC) if ref_BC is not None else None
    if kl_BC is not None and a.kl_mode == "reward":
        rewards = core.kl_penalty(rewards, kl_BC, c.kl_ctl.value, mask_BC)
    with timer("advantages"):
        adv_BC, ret_BC = core.compute_advantages(c.family.advantage, rewards, mask_BC, group_ids=rollout.group_ids_B,
                                                 values=old_values_BC, all_reduce=dist.all_reduce_sum, **adv_params)
        if a.whiten:
            adv_BC = core.whiten(adv_BC, mask_BC, all_reduce=dist.all_reduce_sum)
    batch = TrainBatch(rollout, adv_BC, ret_BC, old_logprobs_BC,
                       ref_BC if a.kl_mode == "loss" else None, old_values_BC)
    c.update_settings.kl_loss_coef = c.kl_ctl.value if (a.kl_mode == "loss" and ref_BC is not None) else 0.0
    with timer("update"):
        ustats = update(c.policy, c.optimizer, batch, c.update_settings, critic=c.critic,
                        all_reduce=dist.all_reduce_sum, max_len=s.max_new_tokens)
    c.scheduler.step()
    kl_mean = float(core.masked_mean(kl_BC, mask_BC, all_reduce=dist.all_reduce_sum)) if kl_BC is not None else 0.0
    c.kl_ctl.update(kl_mean, rollout.batch_size * dist.world_size)
    metrics = _metrics(scored, adv_BC, kl_mean, ustats, timer, c, dist)
    log.log_metrics(step, metrics)
    if step % cfg.log_samples_every == 0:
        log.log_samples(step, _sample_rows(scored, adv_BC))
    return metrics


def _greedy_baseline(c: Components, prompts, rollout) -> torch.Tensor:
    """ReMax: the reward of one greedy completion per prompt, broadcast to its samples. (B,)"""
    greedy = generate(c.policy, c.tokenizer, prompts, n=1, **dict(c.sample_kwargs, greedy=True))
    g_scored = score_batch(greedy, c.scorers, on_error="zero", tokenizer=c.tokenizer)
    return g_scored.rewards_B[rollout.group_ids_B]


def _metrics(scored, adv_BC, kl_mean, ustats, timer, c: Components, dist: DistContext) -> dict[str, float]:
    r = scored.rollout
    mask = r.completion_mask_BC
    rewards = dist.gather_cat(scored.rewards_B)
    lengths = dist.gather_cat(r.completion_lengths_B.float())
    m = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0}
    for name, v in scored.scores.items():
        m[f"reward/{name}"] = float(dist.gather_cat(v.float()).mean())
    if scored.correct_B is not None:
        m["accuracy"] = float(dist.gather_cat(scored.correct_B.float()).mean())
    m["adv_mean"] = float(core.masked_mean(adv_BC, mask, all_reduce=dist.all_reduce_sum))
    m["adv_std"] = float(core.masked_var(adv_BC, mask, all_reduce=dist.all_reduce_sum).sqrt())
    m["adv_abs_max"] = float(dist.all_reduce_max((adv_BC.abs() * mask).max()))
    m["kl"], m["kl_coef"] = kl_mean, c.kl_ctl.value
    m.update({k: float(dist.all_reduce_mean(torch.tensor(v))) for k, v in ustats.items()})
    m["response_length"] = float(lengths.mean())
    m["truncated_frac"] = float(dist.gather_cat((~r.finished_B).float()).mean())
    m["scorer_errors"] = float(dist.all_reduce_sum(torch.tensor(float(scored.num_scorer_errors))))
    m["lr"] = c.optimizer.param_groups[0]["lr"]
    m.update({f"time/{k}": v for k, v in timer.seconds.items()})
    total = sum(timer.seconds.values())
    m["time/step"] = total
    m["tokens_per_s"] = float(lengths.sum()) / max(total, 1e-9)
    return m


def _sample_rows(scored, adv_BC) -> list[dict]:
    r = scored.rollout
    rows = []
    for i in range(r.batch_size):
        n = int(r.completion_mask_BC[i].sum())
        rows.append({"prompt_id": r.prompts[i].id, "prompt": r.prompts[i].text, "completion": r.completions[i],
                     "reward": float(scored.rewards_B[i]),
                     "scores": {k: float(v[i]) for k, v in scored.scores.items()},
                     "advantage": float(adv_BC[i, :n].mean()) if n else 0.0, "length": n})
    return rows


def _save(cfg: TrainConfig, c: Components, dist: DistContext, step: int) -> None:
    state = {"step": step, "prompt_stream": c.stream.state_dict(), "kl_controller": c.kl_ctl.state_dict()}
    if dist.is_main:
        save_checkpoint(cfg.run_dir, step, model=dist.unwrap(c.policy), optimizer=c.optimizer,
                        extra_modules=c.extra_modules, trainer_state=state, scheduler=c.scheduler,
                        keep_last=cfg.keep_checkpoints,
                        tokenizer=c.tokenizer)
    dist.barrier()
