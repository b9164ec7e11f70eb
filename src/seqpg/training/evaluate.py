"""Held-out evaluation: mean reward and accuracy with standard errors, and pass@k.

Mean reward and accuracy come from one greedy completion per prompt (deterministic, so the
standard error is over prompts only).  With ``samples`` = n > 0, n completions per prompt are also
drawn with the run's sampling settings: their mean reward (the prompt's mean, then the mean over
prompts, so the standard error is over prompts), the collapse watch's figures of those completions
(:func:`seqpg.training.collapse.collapse_metrics`: distinct-2, distinct per group, shared openings),
and pass@k with the unbiased estimator of Chen et al. 2021, pass@k = 1 - C(n - c, k) / C(n, k),
averaged over prompts (c = correct samples of that prompt).

The samples are the run's (:mod:`seqpg.rollout.interface`): a multi-turn run is evaluated on whole
episodes, the reward an episode's return (the scorers on its final turn plus the environment's rewards,
weighted as in training), the length its model tokens; held-out prompt i's environments are reset with
the same seed at every evaluation (:func:`seqpg.rollout.seeding.reset_seeds` of step -1), so
evaluations differ by the policy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..batch import Prompt
from ..config import TrainConfig
from ..rollout.interface import Rollouts, rollouts_from_config
from ..rollout.seeding import reset_seeds
from .collapse import collapse_metrics


@dataclass
class EvalResult:
    n_prompts: int
    mean_reward: float
    se_reward: float
    accuracy: float | None
    se_accuracy: float | None
    mean_length: float
    seconds: float
    per_scorer: dict[str, float] = field(default_factory=dict)
    pass_at_k: dict[int, float] = field(default_factory=dict)
    completions: list[dict] = field(default_factory=list)
    sampled_reward: float | None = None
    """Mean reward of the sampled completions (mean per prompt, then over prompts); None without ``samples``."""
    se_sampled_reward: float | None = None
    sampled_collapse: dict[str, float] = field(default_factory=dict)
    """The collapse watch's figures of the sampled completions (``collapse/distinct_2``, ...)."""
    sampled_completions: list[dict] = field(default_factory=list)

    def as_dict(self, with_completions: bool = False) -> dict:
        d = asdict(self)
        if not with_completions:
            d.pop("completions")
            d.pop("sampled_completions")
        d["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        return d


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _rollout_scored(model, tokenizer, chunk: list[Prompt], first: int, scorers, rollouts: Rollouts, *, n: int,
                    greedy: bool, generator, on_error: str, seed: int):
    """(rollout, scored, (B,) reported rewards) of ``n`` samples of each prompt of ``chunk``."""
    rollout = rollouts.sample(model, tokenizer, chunk, n=n, seeds=reset_seeds(seed, -1, first, len(chunk)),
                              generator=generator, greedy=greedy)
    scored = rollouts.score(rollout, scorers, on_error=on_error, tokenizer=tokenizer)
    return rollout, scored, rollouts.reported_rewards(scored)


def evaluate(model, tokenizer, prompts: list[Prompt], scorers, *, rollouts: Rollouts, batch_size: int = 32,
             ks: tuple[int, ...] = (), samples: int = 0, seed: int = 0, progress=None,
             on_error: str = "raise") -> EvalResult:
    """Evaluate ``model`` on ``prompts`` with ``scorers`` (a list of (Scorer, weight)).

    Greedy samples of the run's ``rollouts`` (completions or episodes, with its budget, chat template,
    system prompt, stop strings), in the model's own precision (a run's ``sampling.dtype`` is the training
    sampler's, not the policy's); ``samples`` > 0 adds that many samples per prompt drawn with all of its
    settings (temperature, top-p, top-k): their mean reward and collapse figures; ``ks`` (e.g. (1, 4)) adds
    pass@k from them (``samples`` default max(ks)).  Correctness comes from the scorers that define it. ``on_error``: what a scorer that raises does, as in ``score_batch``.
    """
    if not prompts:
        raise ValueError("evaluate: no prompts given")
    rollouts = rollouts.at_model_precision()  # the policy itself, whatever precision the run samples in
    t0 = time.monotonic()
    was_training = model.training
    model.eval()
    rewards, correct, lengths, per_scorer, rows = [], [], [], {}, []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        rollout, scored, rewards_B = _rollout_scored(model, tokenizer, chunk, lo, scorers, rollouts, n=1, greedy=True,
                                                     generator=None, on_error=on_error, seed=seed)
        rewards += rewards_B.tolist()
        lengths += rollout.completion_lengths_B.tolist()
        if scored.correct_B is not None:
            correct += scored.correct_B.float().tolist()
        for name, v in scored.scores.items():  # over the samples a scorer applied to (None: it did not)
            applies = scored.applies.get(name, torch.ones_like(v, dtype=torch.bool))
            per_scorer.setdefault(name, []).extend(v[applies].tolist())
        rows += [{"prompt": p.text, "completion": comp, "reward": r}
                 for p, comp, r in zip(chunk, rollout.completions, rewards_B.tolist())]
        if progress is not None:
            progress(len(chunk))
    sampled = _sampled(model, tokenizer, prompts, scorers, ks, samples, rollouts, seed, batch_size,
                       on_error) if ks or samples else None
    model.train(was_training)
    n = len(rewards)
    r = torch.tensor(rewards, dtype=torch.float64)
    se = float(r.std() / math.sqrt(n)) if n > 1 else float("nan")
    acc = se_acc = None
    if correct:
        acc = sum(correct) / len(correct)
        se_acc = math.sqrt(acc * (1 - acc) / len(correct)) if len(correct) > 1 else float("nan")
    result = EvalResult(n, float(r.mean()), se, acc, se_acc, sum(lengths) / n, time.monotonic() - t0,
                        {k: sum(v) / len(v) if v else math.nan for k, v in per_scorer.items()}, {}, rows)
    if sampled is not None:
        result.pass_at_k, result.sampled_reward, result.se_sampled_reward, result.sampled_collapse, \
            result.sampled_completions = sampled
        result.seconds = time.monotonic() - t0
    return result


def _sampled(model, tokenizer, prompts, scorers, ks, samples, rollouts: Rollouts, seed, batch_size, on_error):
    """(pass@k for each k, sampled mean reward, its s.e. over prompts, collapse figures, rows) of ``samples``
    (default max(ks)) completions per prompt."""
    n = samples or max(ks)
    gen = torch.Generator().manual_seed(seed)
    per_prompt = max(1, batch_size // n)
    totals = {k: 0.0 for k in ks}
    prompt_means, texts, groups, rewards, rows = [], [], [], [], []
    for lo in range(0, len(prompts), per_prompt):
        chunk = prompts[lo:lo + per_prompt]
        rollout, scored, rewards_B = _rollout_scored(model, tokenizer, chunk, lo, scorers, rollouts, n=n,
                                                     greedy=False, generator=gen, on_error=on_error, seed=seed)
        if ks and scored.correct_B is None:
            raise ValueError("pass@k needs a scorer that defines correctness (e.g. reasoning_gym or exact_match)")
        for g in range(len(chunk)):
            in_g = rollout.group_ids_B == g
            prompt_means.append(float(rewards_B[in_g].double().mean()))
            if ks:
                c = int(scored.correct_B[in_g].sum())
                for k in ks:
                    totals[k] += pass_at_k(n, c, k)
        texts += list(rollout.completions)
        groups += (rollout.group_ids_B + lo).tolist()
        rewards += rewards_B.tolist()
        rows += [{"prompt": chunk[g].text, "completion": comp, "reward": r}
                 for g, comp, r in zip(rollout.group_ids_B.tolist(), rollout.completions, rewards_B.tolist())]
    m = torch.tensor(prompt_means, dtype=torch.float64)
    se = float(m.std() / math.sqrt(len(m))) if len(m) > 1 else float("nan")
    figures = collapse_metrics(torch.tensor(rewards), torch.tensor(groups), texts,
                               openings=rollouts.shared_openings)
    return {k: v / len(prompts) for k, v in totals.items()}, float(m.mean()), se, figures, rows


def evaluate_as_configured(cfg: TrainConfig, model, tok, prompts, scorers, *, ks: tuple[int, ...] = (),
                           samples: int = 0, rollouts: Rollouts | None = None) -> EvalResult:
    """`evaluate` with the run's sampling settings (budget, chat template, system prompt, stop strings) and
    its `on_scorer_error`: what `seqpg eval`, the evaluation during training (`eval_every`) and the
    benchmark's held-out reward all run.  ``rollouts``: the run's, when built already (else built here)."""
    return evaluate(model, tok, prompts, scorers, rollouts=rollouts or rollouts_from_config(cfg), ks=ks,
                    samples=samples, seed=cfg.seed, on_error=cfg.on_scorer_error)
