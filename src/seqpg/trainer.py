"""The training loop: sample -> score -> advantages -> update -> log, one step at a time.

Everything the loop calls is built from the configuration by :mod:`seqpg.build`; the maths
is the core's (:mod:`seqpg.core`), chosen by name from the algorithm family's row in
:mod:`seqpg.algorithms`.  Checkpoints hold weights, optimizer, RNG streams, the prompt
stream's position and the KL controller, so ``seqpg train --resume RUN`` continues exactly.

The same loop runs in every process of a ``torchrun`` launch (:mod:`seqpg.distributed`).
Each step takes the next ``prompts_per_step`` prompts of the stream (the same on every
process) and each process samples and scores its own consecutive share of them, so a
prompt's group of samples stays on one process; batch statistics, loss normalisers,
gradients and metrics are summed over processes.  Only rank 0 writes the run directory.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import core
from .batch import Prompt, RolloutBatch, total_rewards
from .build import Components, build_components
from .checkpoint import StopFlag, latest_checkpoint, save_checkpoint
from .collapse import CollapseWatch, collapse_metrics
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
    c: Components = build_components(cfg, dist)  # scorers and prompts first, then models
    start = 0
    with dist.fail_together("resume"):
        ckpt = latest_checkpoint(run_dir) if resume else None
        if resume and ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints; start without --resume")
        if ckpt is not None:
            state = c.parallel.load_checkpoint(ckpt, c.optimizer, c.scheduler)
            start = state["step"]
            c.stream.load_state_dict(state["prompt_stream"])
            c.kl_ctl.load_state_dict(state["kl_controller"])
        log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                        resume_step=start if ckpt is not None else None)
        log.write_config(to_dict(cfg))
    stop = StopFlag()
    t_start, metrics, step = time.monotonic(), {}, start
    bar = progress_bar(total=cfg.steps, initial=start, enabled=progress and dist.is_main)
    watch = CollapseWatch(cfg.collapse_steps, cfg.collapse_min_distinct)
    with stop:
        for step in range(start + 1, cfg.steps + 1):
            metrics = train_step(cfg, c, dist, step, log)
            bar.update(metrics)
            warning = watch.update(step, metrics)
            if warning and dist.is_main:
                bar.warn(warning)
                log.log_warning(step, warning)
            out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes
            halt = dist.any(stop.is_set() or out_of_time)  # every process stops after the same step
            if step % cfg.save_every == 0 or step == cfg.steps or halt:
                _save(cfg, c, dist, step)
            if halt:
                break
    bar.close()
    log.close()
    return TrainResult(run_dir, step, step < cfg.steps, metrics)


def train_step(cfg: TrainConfig, c: Components, dist: DistContext, step: int, log: RunLogger) -> dict[str, float]:
    """One step: sample -> score -> advantages -> update -> log. Returns the step's metrics."""
    s, a, timer = cfg.sampling, cfg.algo, Timer()
    prompts, first = _my_share(c.stream.take(s.prompts_per_step), dist)
    bf16 = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)  # every forward pass
    with c.parallel.full_params() as model, dist.fail_together("sampling and scoring"), bf16:
        with timer("sample"):
            rollout = _sample(model, c, cfg, prompts, first, step, dist)
        with timer("score"):
            scored = score_batch(rollout, c.scorers, on_error=cfg.on_scorer_error, tokenizer=c.tokenizer)
            adv_params = dict(a.advantage_params, **c.family_params)
            if c.family.greedy_baseline:
                adv_params["baseline"] = _greedy_baseline(model, c, prompts, rollout)
    mask_BC = rollout.completion_mask_BC
    old_logprobs_BC = rollout.sample_logprobs_BC
    with timer("reference"), bf16:
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
                        all_reduce=dist.all_reduce_sum, max_len=s.max_new_tokens, grad_sync=c.parallel)
    c.scheduler.step()
    kl_mean = float(core.masked_mean(kl_BC, mask_BC, all_reduce=dist.all_reduce_sum)) if kl_BC is not None else 0.0
    c.kl_ctl.update(kl_mean, rollout.batch_size * dist.world_size)
    metrics = _metrics(scored, adv_BC, kl_mean, ustats, timer, c, dist)
    log.log_metrics(step, metrics)
    if step % cfg.log_samples_every == 0:
        log.log_samples(step, [row for rows in dist.gather_objects(_sample_rows(scored, adv_BC)) for row in rows])
    return metrics


def _my_share(prompts: list[Prompt], dist: DistContext) -> tuple[list[Prompt], int]:
    """This process's consecutive share of the step's prompts, and the index of its first one."""
    k = len(prompts) // dist.world_size
    return prompts[dist.rank * k:(dist.rank + 1) * k], dist.rank * k


def _sample(model, c: Components, cfg: TrainConfig, prompts: list[Prompt], first: int, step: int,
            dist: DistContext) -> RolloutBatch:
    """``samples_per_prompt`` completions of each prompt, rows grouped by prompt.

    With ``sampling.seed_per_prompt`` each prompt is sampled by its own generator, seeded by
    (seed, step, its index in the step's global batch): its samples do not depend on which
    process draws them.  Otherwise all prompts go in one batched call that draws from the
    global RNG in one process, and from a generator of (seed, step, rank) in several (so that
    processes, whose global RNGs are equal, draw different streams).
    """
    n, seed = cfg.sampling.samples_per_prompt, cfg.seed
    if cfg.sampling.seed_per_prompt:
        parts = [generate(model, c.tokenizer, [p], n=n, **c.sample_kwargs,
                          generator=_generator(dist.device, seed, step, "prompt", first + i))
                 for i, p in enumerate(prompts)]
        return _concat_rollouts(parts, c.tokenizer.pad_token_id)
    gen = _generator(dist.device, seed, step, "rank", dist.rank) if dist.enabled else None
    return generate(model, c.tokenizer, prompts, n=n, generator=gen, **c.sample_kwargs)


def _generator(device: torch.device, *key) -> torch.Generator:
    """A generator seeded by a hash of ``key`` (independent streams for distinct keys)."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _concat_rollouts(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One rollout from several: prompts left-padded, completions right-padded to common widths."""
    P = max(r.prompt_ids_BP.shape[1] for r in parts)
    C = max(r.completion_ids_BC.shape[1] for r in parts)

    def cat(name: str, width: int, left: bool, fill) -> torch.Tensor:
        ts = [getattr(r, name) for r in parts]
        return torch.cat([F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=fill)
                          for t in ts])

    return RolloutBatch(
        prompts=[p for r in parts for p in r.prompts], completions=[t for r in parts for t in r.completions],
        prompt_ids_BP=cat("prompt_ids_BP", P, True, pad_id), prompt_mask_BP=cat("prompt_mask_BP", P, True, False),
        completion_ids_BC=cat("completion_ids_BC", C, False, pad_id),
        completion_mask_BC=cat("completion_mask_BC", C, False, False),
        sample_logprobs_BC=cat("sample_logprobs_BC", C, False, 0.0),
        group_ids_B=torch.cat([r.group_ids_B + i for i, r in enumerate(parts)]),
        finished_B=torch.cat([r.finished_B for r in parts]))


def _greedy_baseline(model, c: Components, prompts, rollout) -> torch.Tensor:
    """ReMax: the reward of one greedy completion per prompt, broadcast to its samples. (B,)"""
    greedy = generate(model, c.tokenizer, prompts, n=1, **dict(c.sample_kwargs, greedy=True))
    g_scored = score_batch(greedy, c.scorers, on_error="zero", tokenizer=c.tokenizer)
    return g_scored.rewards_B[rollout.group_ids_B]


def _metrics(scored, adv_BC, kl_mean, ustats, timer, c: Components, dist: DistContext) -> dict[str, float]:
    """The step's metrics over all processes (``ustats`` come global from ``update``)."""
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
    m.update(ustats)
    m["response_length"] = float(lengths.mean())
    m["truncated_frac"] = float(dist.gather_cat((~r.finished_B).float()).mean())
    m["scorer_errors"] = float(dist.all_reduce_sum(torch.tensor(float(scored.num_scorer_errors))))
    m["lr"] = c.optimizer.param_groups[0]["lr"]
    local = collapse_metrics(scored.rewards_B, r.group_ids_B, r.completions)  # mean over processes
    m.update(zip(local, (dist.all_reduce_sum(torch.tensor(list(local.values()))) / dist.world_size).tolist()))
    seconds = dist.all_reduce_max(torch.tensor(list(timer.seconds.values()), dtype=torch.float64)).tolist()
    m.update({f"time/{k}": v for k, v in zip(timer.seconds, seconds)})  # the slowest process's
    total = sum(seconds)
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
    """Rank 0 writes the checkpoint (under FSDP2 every process first helps gather the full tensors)."""
    state = {"step": step, "prompt_stream": c.stream.state_dict(), "kl_controller": c.kl_ctl.state_dict()}
    view = c.parallel.checkpoint_view(c.optimizer)
    with dist.fail_together("checkpoint"):
        if view is not None:
            save_checkpoint(cfg.run_dir, step, model=view.model, optimizer=view.optimizer,
                            extra_modules=view.extra_modules, trainer_state=state, scheduler=c.scheduler,
                            keep_last=cfg.keep_checkpoints, tokenizer=c.tokenizer)
