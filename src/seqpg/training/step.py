"""One training step as named stages, over settings decided once.

    sample  ->  score  ->  judge (reference, KL shaping, advantages)  ->  update

:class:`StepSettings` is built once from the configuration (:meth:`StepSettings.from_config`) and
is immutable: the family's estimator and loss (or the ones ``algo.advantage`` / ``algo.loss``
name), what the estimator needs, the estimator's parameters, the rollouts (completions or episodes,
with their sampling settings), the precision and the update's arguments.  What changes between steps (the adaptive KL coefficient, the step
number) is an argument of the stage that uses it.

The training loop (:mod:`seqpg.training.trainer`), ``seqpg explain`` and the tests call these functions;
there is one way to turn a scored batch into advantages (:func:`judge`), so what ``explain``
shows is what the step trained on, KL penalty included.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ContextManager, Mapping

import torch

from .. import core
from ..algorithms import Family, Needs, resolve_family
from ..batch import Prompt, RolloutBatch, ScoredBatch, concat_rollouts, total_rewards
from ..config import AlgoConfig, TrainConfig
from ..model.policy import completion_logprobs
from .precision import autocast
from ..rollout.interface import Rollouts, rollouts_from_config
from ..rollout.sampling import SampleSettings
from ..rollout.seeding import reset_seeds, seeded_generator
from .update import TrainBatch, UpdateSettings


def estimator_params(a: AlgoConfig, advantage: str) -> dict[str, Any]:
    """Keyword arguments of the estimator ``advantage``: ``algo.advantage_params`` plus gamma / lam where
    it takes them (what the step trains with, and what ``seqpg lab`` measures each estimator with)."""
    accepted = core.advantage_params(advantage)
    params = {k: v for k, v in (("gamma", a.gamma), ("lam", a.lam)) if k in accepted}
    params.update({k: v for k, v in a.advantage_params.items() if k in accepted})
    return params


@dataclass(frozen=True)
class StepSettings:
    """Everything a step decides, resolved once from a :class:`~seqpg.config.TrainConfig`."""

    family: Family
    """The family with ``algo.advantage`` / ``algo.loss`` applied: the estimator and loss trained with."""
    advantage_params: Mapping[str, Any]
    """Keyword arguments of the estimator: ``algo.advantage_params`` plus gamma / lam where it takes them."""
    whiten: bool
    rollouts: Rollouts
    """How the step samples and scores: single-turn completions or multi-turn episodes
    (:mod:`seqpg.rollout.interface`), chosen here once."""
    samples_per_prompt: int
    seed_per_prompt: bool
    seed: int
    kl_mode: str
    """``reward``: the KL to the reference is a per-token reward penalty; ``loss``: a loss term."""
    uses_reference: bool
    """``algo.kl_coef > 0``: the step computes reference log-probs."""
    update: UpdateSettings
    on_scorer_error: str
    sample_rounds: int = 1
    """Draws of prompts a step may make: 1, or ``sampling.max_sample_rounds`` with dynamic sampling
    (:mod:`seqpg.training.dynamic`)."""
    overlong_filter: bool = False
    """Truncated completions are masked out of the loss (``algo.overlong_filter``)."""
    sampler_correction: str = "none"
    """The importance correction of the sampler's mismatch (``algo.sampler_correction``, resolved:
    :func:`sampler_correction`): a name of :data:`seqpg.core.SAMPLER_CORRECTIONS`, or ``none``."""
    sampler_is_cap: float = 2.0
    """The correction's cap C (``algo.sampler_is_cap``)."""
    sampler_check: bool = False
    """The step computes pi at the sampling weights with the training forward (the old policy of the loss),
    logs ``mismatch/*``, and weights the loss when ``sampler_correction`` is not ``none``: the sampler's
    precision differs from the training's, or a correction was asked for."""

    @property
    def needs(self) -> Needs:
        return self.family.needs

    @property
    def kl_in_advantages(self) -> bool:
        """KL as a reward penalty added after a sampled-baseline estimator (eq. (1) of :mod:`seqpg.core.kl`)."""
        return self.kl_mode == "reward" and not self.needs.critic

    @property
    def sample(self) -> SampleSettings:
        """The sampling settings (the rollouts')."""
        return self.rollouts.sampling

    @property
    def kl_estimator(self) -> str:
        """The KL estimator of the penalty and of the loss term (the update's)."""
        return self.update.kl_estimator

    @property
    def kl_noise_floor(self) -> float:
        """|log pi - log pi_ref| at or below which a token's KL is exactly 0 (``algo.kl_noise_floor``, resolved;
        the update's)."""
        return self.update.kl_noise_floor

    @property
    def bf16(self) -> bool:
        """bfloat16 autocast for every forward pass (:func:`seqpg.training.precision.autocast`; the update's)."""
        return self.update.bf16

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "StepSettings":
        a, o, s = cfg.algo, cfg.optim, cfg.sampling
        family = resolve_family(a.name, a.advantage, a.loss)
        params = estimator_params(a, family.advantage)
        update = UpdateSettings(loss=family.loss, agg=a.agg or family.agg, loss_params=dict(a.loss_params),
                                epochs=a.epochs or family.epochs, minibatches=a.minibatches,
                                micro_batch_size=o.micro_batch_size, max_grad_norm=o.max_grad_norm,
                                temperature=s.temperature, kl_estimator=a.kl_estimator_used,
                                kl_noise_floor=kl_noise_floor(cfg),
                                entropy_coef=a.entropy_coef, vf_coef=a.vf_coef, vf_clip=a.vf_clip, bf16=cfg.bf16,
                                on_nonfinite=o.on_nonfinite, grad_noise=o.grad_noise)
        correction = sampler_correction(cfg)
        return cls(family=family, advantage_params=MappingProxyType(params), whiten=a.whiten,
                   rollouts=rollouts_from_config(cfg), samples_per_prompt=s.samples_per_prompt,
                   seed_per_prompt=s.seed_per_prompt, seed=cfg.seed, kl_mode=a.kl_mode_used,
                   uses_reference=a.kl_coef > 0, update=update,
                   on_scorer_error=cfg.on_scorer_error,
                   sample_rounds=s.max_sample_rounds if s.dynamic_sampling else 1, overlong_filter=a.overlong_filter,
                   sampler_correction=correction, sampler_is_cap=a.sampler_is_cap,
                   sampler_check=sampler_differs(cfg) or correction != "none")

    @property
    def max_completion_tokens(self) -> int:
        """The most completion columns a row can have (the Dr. GRPO loss's constant normaliser)."""
        return self.rollouts.max_completion_tokens

    def autocast(self, device: torch.device | str) -> ContextManager:
        """The step's precision on ``device`` (the only place a stage's autocast comes from)."""
        return autocast(torch.device(device).type, self.bf16)


KL_NOISE_FLOOR = {False: 1e-3, True: 0.3}
"""``algo.kl_noise_floor`` when null, by whether a pass runs in bfloat16: above the largest disagreement between
sampler, trainer layouts and reference on the same weights (``bench/logprob_disagreement.py``; the figures, per
model and precision, are in docs/maths.md). In bf16 that disagreement is large, so the KL there acts only on
tokens whose log-ratio exceeds the floor."""


def kl_noise_floor(cfg: TrainConfig) -> float:
    """The run's KL noise floor: ``algo.kl_noise_floor``, or the precision's default (:data:`KL_NOISE_FLOOR`)."""
    if cfg.algo.kl_noise_floor is not None:
        return cfg.algo.kl_noise_floor
    return KL_NOISE_FLOOR[trains_in_bf16(cfg)]


def trains_in_bf16(cfg: TrainConfig) -> bool:
    """Whether the training forward runs in bfloat16 (``bf16`` autocast, or ``model.dtype=bfloat16`` weights)."""
    return bool(cfg.bf16) or cfg.model.dtype == "bfloat16"


def sampler_differs(cfg: TrainConfig) -> bool:
    """Whether the sampler's precision (``sampling.dtype``) differs from the training forward's (``bf16``,
    ``model.dtype``)."""
    trainer = "bfloat16" if trains_in_bf16(cfg) else "float32"
    return cfg.sampling.dtype is not None and cfg.sampling.dtype != trainer


def sampler_correction(cfg: TrainConfig) -> str:
    """``algo.sampler_correction``, or when null ``tis`` for a sampler of another precision, else ``none``."""
    if cfg.algo.sampler_correction is not None:
        return cfg.algo.sampler_correction
    return "tis" if sampler_differs(cfg) else "none"


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------

def sample(model, tokenizer, prompts: list[Prompt], st: StepSettings, *, step: int, first: int = 0,
           device: torch.device | str = "cpu", rank: int | None = None) -> RolloutBatch:
    """``samples_per_prompt`` samples (completions or episodes: ``st.rollouts``) of each prompt, rows grouped
    by prompt.

    With ``seed_per_prompt`` each prompt is sampled by its own generator, seeded by (seed, step, its
    index ``first + i`` in the step's global batch): its samples do not depend on which process draws
    them.  Otherwise all prompts go in one batched call that draws from the global RNG in one process
    (``rank`` None), and from a generator of (seed, step, rank) in several (processes, whose global RNGs
    are equal, must draw different streams).  Environments are reset by the prompt's global index either way.
    """
    n, r = st.samples_per_prompt, st.rollouts
    seeds = reset_seeds(st.seed, step, first, len(prompts))
    if st.seed_per_prompt:
        parts = [r.sample(model, tokenizer, [p], n=n, seeds=[seeds[i]],
                          generator=seeded_generator(device, st.seed, step, "prompt", first + i))
                 for i, p in enumerate(prompts)]
        rollout = concat_rollouts(parts, tokenizer.pad_token_id)
    else:
        gen = seeded_generator(device, st.seed, step, "rank", rank) if rank is not None else None
        rollout = r.sample(model, tokenizer, prompts, n=n, seeds=seeds, generator=gen)
    r.check_batch(rollout)  # e.g. every episode's environment failed: one line, not a step on nothing
    return rollout


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------

@dataclass
class Scored:
    """The scorers' verdict on a rollout, and what the estimator needs from scoring besides it."""

    batch: ScoredBatch
    baseline_B: torch.Tensor | None = None  # (B,) ReMax: the reward of the greedy sample of each row's prompt


def score(model, tokenizer, rollout: RolloutBatch, prompts: list[Prompt], scorers, st: StepSettings) -> Scored:
    """Score ``rollout`` (``prompts``: its distinct prompts, in group order); with an estimator that needs
    a greedy baseline, also sample and score one greedy sample per prompt (an episode's environment reset
    as the prompt's sampled episodes were)."""
    scored = st.rollouts.score(rollout, scorers, on_error=st.on_scorer_error, tokenizer=tokenizer)
    baseline_B = None
    if st.needs.greedy_baseline:
        baseline_B = st.rollouts.greedy_baseline(model, tokenizer, rollout, prompts, scorers)
    return Scored(scored, baseline_B)


# ---------------------------------------------------------------------------------------------
# judge: reference and critic passes, KL shaping, advantages
# ---------------------------------------------------------------------------------------------

@dataclass
class SamplerCheck:
    """The sampler as the trainer sees it: pi at the sampling weights in the training precision, the correction's
    weights and the mismatch's statistics (:mod:`seqpg.core.mismatch`)."""

    train_logprobs_BC: torch.Tensor  # (B, C) log pi of the sampled tokens, training forward, 0 on padding
    weights_BC: torch.Tensor | None  # (B, C) importance weights of st.sampler_correction; None with ``none``
    stats: core.MismatchStats  # this process's sums


def check_sampler(policy, rollout: RolloutBatch, st: StepSettings) -> SamplerCheck:
    """One forward of ``policy`` without gradients in the caller's (the training's) precision, in micro-batches
    of the update's size: log pi of the sampled tokens, what the update's first forward will see; then the
    correction's weights against the sampler's own log-probs and the mismatch statistics."""
    B = rollout.batch_size
    step = st.update.micro_batch_size or B
    with torch.no_grad():
        parts = [completion_logprobs(policy, rollout.select(torch.arange(lo, min(lo + step, B))),
                                     temperature=st.sample.temperature).logprobs_BC.float()
                 for lo in range(0, B, step)]
    mask_BC = rollout.completion_mask_BC
    train_BC = torch.cat(parts).to(mask_BC.device) * mask_BC
    correction = None
    if st.sampler_correction != "none":
        correction = core.sampler_correction(st.sampler_correction, train_BC, rollout.sample_logprobs_BC, mask_BC,
                                             cap=st.sampler_is_cap)
    stats = core.mismatch_stats(train_BC, rollout.sample_logprobs_BC, mask_BC,
                                truncated=None if correction is None else correction.truncated_BT)
    return SamplerCheck(train_BC, None if correction is None else correction.weights_BT, stats)


@dataclass
class Judged:
    """Everything the update and the logs need from a scored rollout."""

    rewards: Any  # the rewards the estimator saw: (B,) sequence or (B, C) token rewards (KL shaped for a critic)
    advantages_BC: torch.Tensor  # (B, C)
    returns_BC: torch.Tensor  # (B, C)
    kl_BC: torch.Tensor | None  # (B, C) estimated KL(sampler || reference) per token, None without a reference
    ref_logprobs_BC: torch.Tensor | None  # (B, C)
    old_values_BC: torch.Tensor | None  # (B, C) critic values at sampling time
    kl_coef: float  # the KL coefficient this step used
    in_loss_B: torch.Tensor | None = None  # (B,) bool, rows the loss sees (overlong filtering); None: all
    task_adv_abs_max: float = 0.0  # max |A| of the estimator's part (this process), before a KL penalty is added
    sampler: SamplerCheck | None = None  # the trainer's view of the sampler (st.sampler_check), else None

    def train_batch(self, rollout: RolloutBatch, st: StepSettings) -> TrainBatch:
        """What :func:`seqpg.training.update.update` trains on (reference log-probs only when KL is a loss term;
        the old policy is the training forward's at the sampling weights when the step computed it)."""
        old_BC = self.sampler.train_logprobs_BC if self.sampler is not None else rollout.sample_logprobs_BC
        weights_BC = self.sampler.weights_BC if self.sampler is not None else None
        return TrainBatch(rollout, self.advantages_BC, self.returns_BC, old_BC,
                          self.ref_logprobs_BC if st.kl_mode == "loss" else None, self.old_values_BC,
                          in_loss_B=self.in_loss_B, sampler_weights_BC=weights_BC)

    def kl_loss_coef(self, st: StepSettings) -> float:
        """The weight of the update's KL loss term (0 unless KL is a loss term with a reference)."""
        return self.kl_coef if st.kl_mode == "loss" and self.ref_logprobs_BC is not None else 0.0


def judge(rollout: RolloutBatch, scored: Scored, st: StepSettings, *, kl_coef: float, reference=None, critic=None,
          all_reduce: Callable | None = None, timer: Callable[[str], ContextManager] | None = None,
          policy=None) -> Judged:
    """Reference and critic passes, the KL penalty (``kl_mode=reward``) and the advantages of ``rollout``.

    ``kl_coef`` is this step's coefficient (the KL controller's value); ``all_reduce`` sums over
    processes (group statistics and whitening see the global batch); ``timer(name)`` (optional) times
    the ``reference``, ``sampler_check`` and ``advantages`` parts.  With ``st.sampler_check`` the ``policy``
    is run once more (:func:`check_sampler`), and the KL to the reference is then taken from its log-probs.
    """
    time = timer or (lambda _name: nullcontext())
    mask_BC = rollout.completion_mask_BC
    sampler = None
    if st.sampler_check:
        if policy is None:
            raise ValueError("judge: st.sampler_check needs the policy (its log-probs at the sampling weights)")
        with time("sampler_check"):
            sampler = check_sampler(policy, rollout, st)
    with time("reference"):
        ref_BC = reference.logprobs(rollout, temperature=st.sample.temperature) if reference is not None else None
        values_BC = critic.values_of(rollout) if critic is not None else None
    rewards = total_rewards(scored.batch)
    old_BC = sampler.train_logprobs_BC if sampler is not None else rollout.sample_logprobs_BC
    kl_BC = core.kl_estimate(st.kl_estimator, old_BC, ref_BC, tol=st.kl_noise_floor) if ref_BC is not None else None
    shaped = kl_BC is not None and st.kl_mode == "reward"
    if shaped and not st.kl_in_advantages:  # a critic learns the values of the KL-shaped return
        rewards = core.kl_penalty(rewards, kl_BC, kl_coef, mask_BC)
    params = dict(st.advantage_params)
    if scored.baseline_B is not None:
        params["baseline"] = scored.baseline_B
    with time("advantages"):
        adv_BC, ret_BC = core.compute_advantages(st.family.advantage, rewards, mask_BC, group_ids=rollout.group_ids_B,
                                                 values=values_BC, all_reduce=all_reduce, **params)
        if st.whiten:
            adv_BC = core.whiten(adv_BC, mask_BC, all_reduce=all_reduce)
        task_adv_abs_max = float(adv_BC.abs().max()) if adv_BC.numel() else 0.0
        if shaped and st.kl_in_advantages:  # the task's advantages, then the penalty at its own scale
            adv_BC = adv_BC + core.kl_advantages(kl_BC, kl_coef, mask_BC, params.get("gamma", 1.0))
    in_loss_B = None
    if st.overlong_filter:  # DAPO: a truncated completion's reward judges an unfinished answer; it gets no loss
        in_loss_B = rollout.finished_B.clone()
        adv_BC = adv_BC * in_loss_B[:, None]
    return Judged(rewards, adv_BC, ret_BC, kl_BC, ref_BC, values_BC, kl_coef, in_loss_B, task_adv_abs_max, sampler)
