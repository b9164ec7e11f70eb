"""`seqpg sft`: supervised fine-tuning on demonstrations as the policy-gradient update with A = 1.

With the advantage fixed at 1 on every action token, the utility U = sum_t m_t log pi(x_t | x_<t) A_t
is the log-likelihood of the actions, and the ``pg`` loss under ``token-mean`` aggregation is the
mean negative log-likelihood of the assistant's tokens: maximum likelihood (behaviour cloning).  So
``seqpg sft`` is not a second trainer: a step lays the demonstrations out as a
:class:`~seqpg.batch.RolloutBatch` (prompt | completion with the assistant's tokens as the action
mask, holes where tool and user turns sit, as a multi-turn episode; :mod:`seqpg.sft.demos`) and
calls the RL step's own update (:func:`seqpg.training.update.update`) on it.  LoRA, bf16,
micro-batches, the non-finite guard, gradient noise, torchrun (DDP / FSDP2), atomic checkpoints,
resume and export are the RL run's.

Data order: epoch e visits the training rows in a permutation seeded by (seed, e), ``batch_size``
rows a step (a last partial batch is dropped; the next epoch's permutation covers the rows again),
so the rows of step k follow from k alone and a resumed run trains on exactly the rows the
uninterrupted run would.  Under torchrun each process trains on its consecutive share of a step's rows.

Metrics per step: ``loss`` (the update's mean NLL of the step's action tokens, before its optimizer
step), ``token_accuracy`` (fraction of action tokens that are the model's argmax, same weights, from a
no-grad pass), ``tokens``, ``grad_norm``, ``lr``, ``epoch``; held-out ``eval/loss`` and
``eval/token_accuracy`` before the first step, every ``sft.eval_every`` steps and after the last.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batch import RolloutBatch
from ..config import ConfigError, TrainConfig, to_dict
from ..model.policy import position_ids_from_mask
from ..training.build import build_kl_controller, build_optimizer, build_policy, seed_everything
from ..rundir.checkpoint import checkpoint_to_resume
from ..rundir.parallel_checkpoint import load_parallel_checkpoint, save_parallel_checkpoint
from ..training.distributed import DistContext, Parallel
from ..training.precision import autocast
from ..rundir.resume import apply_resume_changes, record_resume_changes, resume_changes
from ..rundir.runlock import RunLock
from ..rundir.runlog import RunLogger, Timer, progress_bar
from ..rundir.signals import StopFlag
from ..training.trainer import TrainResult
from ..training.update import TrainBatch, UpdateSettings, refuse_nonfinite_parameters, update
from .data import SftData, load_sft_data

FROZEN_ON_RESUME = ("sft.data", "sft.eval_data", "sft.eval_fraction", "sft.batch_size", "sft.max_length")
"""Keys a resumed SFT run cannot change: the rows of every step follow from them."""


@dataclass(frozen=True)
class Schedule:
    """Which training rows each step takes (see the module docstring)."""

    rows: int
    batch_size: int
    epochs: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def step_rows(self, step: int) -> list[int]:
        """Indices of the training rows of ``step`` (1-based), all processes together."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.rows, generator=gen)
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def update_settings(cfg: TrainConfig) -> UpdateSettings:
    """The update of an SFT step: the ``pg`` loss (-log pi A) with A = 1, ``token-mean``, one pass, temperature 1."""
    o = cfg.optim
    return UpdateSettings(loss="pg", agg="token-mean", epochs=1, minibatches=1, micro_batch_size=o.micro_batch_size,
                          max_grad_norm=o.max_grad_norm, temperature=1.0, bf16=cfg.bf16, on_nonfinite=o.on_nonfinite,
                          grad_noise=o.grad_noise, kl_estimator=cfg.algo.kl_estimator_used, kl_noise_floor=0.0)


def sft_batch(rollout: RolloutBatch) -> TrainBatch:
    """The update's batch: advantage 1 on every action token (0 elsewhere), no returns, no behaviour log-probs
    needed (the ``pg`` loss reads none)."""
    mask_BC = rollout.completion_mask_BC
    zeros_BC = torch.zeros(mask_BC.shape)
    return TrainBatch(rollout, advantages_BC=mask_BC.float(), returns_BC=zeros_BC, old_logprobs_BC=zeros_BC)


@torch.no_grad()
def token_stats(model, rollout: RolloutBatch, *, micro_batch_size: int = 0, bf16: bool = False) -> torch.Tensor:
    """(3,) float64 sums over the action tokens of ``rollout``: [NLL, argmax hits, tokens], at temperature 1."""
    from ..model.policy import model_device

    device = model_device(model)
    out = torch.zeros(3, dtype=torch.float64)
    B = rollout.batch_size
    step = micro_batch_size or B
    for lo in range(0, B, step):
        part = rollout.select(list(range(lo, min(lo + step, B)))).to(device)
        C = part.completion_ids_BC.shape[1]
        mask_BL = part.attention_mask_BL
        with autocast(device.type, bf16):
            logits = model(input_ids=part.input_ids_BL, attention_mask=mask_BL.long(),
                           position_ids=position_ids_from_mask(mask_BL), logits_to_keep=C + 1, use_cache=False).logits
        logits_BCV = logits[:, :-1].float()
        ids_BC, m_BC = part.completion_ids_BC, part.completion_mask_BC
        lp_BC = torch.log_softmax(logits_BCV, dim=-1).gather(-1, ids_BC[..., None]).squeeze(-1)
        hit_BC = logits_BCV.argmax(dim=-1) == ids_BC
        out += torch.stack([-(lp_BC * m_BC).sum(), (hit_BC & m_BC).sum(), m_BC.sum()]).double().cpu()
    return out


def sft(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train on ``cfg.sft.data`` as configured; with ``resume`` continue from the run's latest checkpoint.

    Under ``torchrun`` every process calls this."""
    dist = DistContext.from_env(cfg.device, cfg.dist_backend, cfg.dist_timeout_s)
    try:
        run_dir = Path(cfg.run_dir)
        with ExitStack() as held:
            with dist.fail_together("locking the run directory"):
                if dist.is_main:
                    held.enter_context(RunLock(run_dir))
            return _run(cfg, dist, resume, progress, run_dir)
    finally:
        dist.close()


def _resume_changes(run_dir: Path, cfg: TrainConfig) -> dict:
    changes = resume_changes(run_dir, cfg)
    frozen = [k for k in changes if k in FROZEN_ON_RESUME]
    if frozen:
        raise ConfigError(f"--resume cannot change {', '.join(frozen)} mid-run (the rows of every step follow from "
                          "them); drop those overrides, or start a new run_dir")
    return changes


def _run(cfg: TrainConfig, dist: DistContext, resume: bool, progress: bool, run_dir: Path) -> TrainResult:
    changes = _resume_changes(run_dir, cfg) if resume else {}
    with dist.fail_together("reading the demonstrations"):
        data = load_sft_data(cfg)  # the tokenizer only: a bad row fails before any model loads
    plan = Schedule(len(data.train), cfg.sft.batch_size, cfg.sft.epochs, cfg.seed)
    if cfg.sft.batch_size % dist.world_size:
        raise ConfigError(f"sft.batch_size={cfg.sft.batch_size} cannot be split over {dist.world_size} processes; "
                          f"make it a multiple of {dist.world_size}")
    with dist.fail_together("setup"):
        seed_everything(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        policy, tok = build_policy(cfg.model, cfg.seed, dist.device)
    parallel = Parallel.wrap(policy, {}, dist, cfg.parallel)
    optimizer, scheduler = build_optimizer(cfg.optim, parallel.policy, None, None)
    start = 0
    with dist.fail_together("resume"):
        ckpt = checkpoint_to_resume(run_dir, resume)
        if ckpt is not None:
            start = load_parallel_checkpoint(parallel, ckpt, optimizer, scheduler, verify=False)["step"]
            apply_resume_changes(changes, cfg, optimizer, scheduler, build_kl_controller(cfg.algo))
        log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                        resume_step=start if ckpt is not None else None)
        log.write_config(to_dict(cfg))
        if dist.is_main:
            record_resume_changes(run_dir, start + 1, changes)
    return _loop(cfg, dist, data, plan, parallel, optimizer, scheduler, tok, log, start, progress)


def _loop(cfg, dist, data: SftData, plan: Schedule, parallel: Parallel, optimizer, scheduler, tok, log: RunLogger,
          start: int, progress: bool) -> TrainResult:
    settings, total = update_settings(cfg), plan.total_steps
    stop, t_start, metrics, step, signalled, timed_out = StopFlag(), time.monotonic(), {}, start, False, False
    bar = progress_bar(total=total, initial=start, enabled=progress and dist.is_main, desc="sft")
    try:
        with stop:
            if start == 0:
                _held_out(cfg, dist, data, parallel, log, 0, total)
            for step in range(start + 1, total + 1):
                metrics = _step(cfg, dist, data, plan, parallel, optimizer, scheduler, settings, step)
                log.log_metrics(step, metrics)
                _held_out(cfg, dist, data, parallel, log, step, total)
                bar.update(metrics)
                out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes
                asked = torch.tensor([stop.is_set(), out_of_time, stop.take_checkpoint_request()], dtype=torch.int64)
                signalled, timed_out, save_now = dist.all_reduce_max(asked).tolist()  # every process alike
                halt = signalled or timed_out
                if step % cfg.save_every == 0 or step == total or halt or save_now:
                    _save(cfg, dist, parallel, optimizer, scheduler, tok, step)
                if halt:
                    break
    finally:
        bar.close()
        log.close()
        if dist.is_main:
            from .plots import plot_sft
            plot_sft(Path(cfg.run_dir))
    return TrainResult(Path(cfg.run_dir), step, step < total, metrics, out_of_time=bool(timed_out and not signalled))


def _step(cfg, dist, data: SftData, plan: Schedule, parallel: Parallel, optimizer, scheduler,
          settings: UpdateSettings, step: int) -> dict[str, float]:
    """One optimizer step on this process's share of the step's rows; the step's global metrics."""
    timer = Timer()
    rows = plan.step_rows(step)
    k = len(rows) // dist.world_size
    rollout = data.train_batch(rows[dist.rank * k:(dist.rank + 1) * k])
    with timer("stats"):
        sums = dist.all_reduce_sum(token_stats(parallel.policy, rollout, micro_batch_size=cfg.optim.micro_batch_size,
                                               bf16=cfg.bf16).to(dist.device)).cpu()
    with timer("update"):
        ustats = update(parallel.policy, optimizer, sft_batch(rollout), settings, all_reduce=dist.all_reduce_sum,
                        max_len=rollout.completion_ids_BC.shape[1], grad_sync=parallel)
    scheduler.step()
    seconds = sum(timer.seconds.values())
    m = {"loss": ustats["pg_loss"], "token_accuracy": float(sums[1] / max(float(sums[2]), 1.0)),
         "tokens": float(sums[2]), "epoch": step / plan.steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
         **{k: v for k, v in ustats.items() if k in ("grad_norm", "skipped_steps", "nonfinite_steps", "entropy")
            or k.startswith("gns/")}}
    m.update({f"time/{k}": v for k, v in timer.seconds.items()})
    m["time/step"], m["tokens_per_s"] = seconds, float(sums[2]) / max(seconds, 1e-9)
    return m


def _held_out(cfg, dist, data: SftData, parallel: Parallel, log: RunLogger, step: int, total: int) -> None:
    """Log eval/loss and eval/token_accuracy when due (every process evaluates every held-out row)."""
    every = cfg.sft.eval_every
    if not data.held_out or not (step in (0, total) or (every and step % every == 0)):
        return
    t0 = time.perf_counter()
    with parallel.full_params() as model:
        sums = token_stats(model, data.held_out_batch(), micro_batch_size=cfg.optim.micro_batch_size, bf16=cfg.bf16)
    n = max(float(sums[2]), 1.0)
    log.log_metrics(step, {"eval/loss": float(sums[0]) / n, "eval/token_accuracy": float(sums[1]) / n,
                           "eval/rows": len(data.held_out), "time/eval": time.perf_counter() - t0})


def _save(cfg, dist, parallel: Parallel, optimizer, scheduler, tok, step: int) -> None:
    with dist.fail_together("checkpoint"):
        refuse_nonfinite_parameters({"policy": parallel.policy}, step)
    save_parallel_checkpoint(parallel, cfg.run_dir, step, optimizer, trainer_state={"step": step},
                             scheduler=scheduler, keep_last=cfg.keep_checkpoints, tokenizer=tok)


def print_summary(result: TrainResult) -> None:
    """One line on stdout at the end of a run (rank 0)."""
    loss = result.final_metrics.get("loss")
    said = f"; last loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else ""
    print(f"seqpg: {result.steps_done} SFT steps done{said}; run in {result.run_dir}"
          + (" (max_minutes reached; continue with --resume)" if result.out_of_time
             else " (stopped early; continue with --resume)" if result.stopped_early else ""), file=sys.stdout)
