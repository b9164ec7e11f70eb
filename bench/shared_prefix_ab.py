"""Sampling time of a multi-turn step with the shared first-input prefill vs each episode's first input in full, A/B.

    PYTHONPATH=src taskset -c 1 python bench/shared_prefix_ab.py [--reps 5] [--threads 1]
    (--model tiny --set episode.max_episode_tokens=2000 sampling.max_new_tokens=4 --reps 1: a smoke run)

The run of examples/env_secret_code.yaml (its system message, its lookup_code tool, its secret-code
environment; 2 prompts x 8 samples, up to 3 turns of 48 tokens) sampled by the rollout the training step
uses.  A ("full"): every episode's first input prefilled in full, the sampler's first chunk before the shared
prefill (``KVRows._start`` replaced by the plain chunk).  B ("distinct"): identical first inputs once (a
group's), without the common prefix of the distinct ones.  C ("shared"): as the sampler runs now, identical
first inputs once and the step's common prefix once (seqpg.rollout.prefix).  Each repetition samples the same
prompts with the same generator under each, in rotating order, and checks that they give the same episodes;
then the medians of each and of the per-repetition ratios to "shared", and how many episodes came out the
same as "shared" (the prefill's rounding differs: see ``compare``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from seqpg.batch import RolloutBatch
from seqpg.config import load_config
from seqpg.rollout import multiturn
from seqpg.rollout.multiturn import KVRows
from seqpg.rollout.seeding import reset_seeds
from seqpg.training.build import build_components
from seqpg.training.distributed import DistContext

ROOT = Path(__file__).resolve().parents[1]
SHARED_START = KVRows._start


def full_start(self, first_ids):
    """The first chunk as before the shared prefill: every row's first input through the model in full."""
    ids_BD, real_BD, pos_BD = self._chunk(first_ids)
    self.prefilled = int(real_BD.sum())
    return self._forward(ids_BD, real_BD, pos_BD)


def distinct_start(self, first_ids):
    """The first chunk with identical rows once but the distinct rows' common prefix not shared."""
    shared_prefill, multiturn.shared_prefill = multiturn.shared_prefill, lambda *args: 0
    try:
        return SHARED_START(self, first_ids)
    finally:
        multiturn.shared_prefill = shared_prefill


def timed(c, prompts, seeds, rep: int, start) -> tuple[float, RolloutBatch]:
    KVRows._start = start
    try:
        t0 = time.perf_counter()
        rollout = c.settings.rollouts.sample(c.policy, c.tokenizer, prompts, n=c.settings.samples_per_prompt,
                                             seeds=seeds, generator=torch.Generator().manual_seed(rep))
        return time.perf_counter() - t0, rollout
    finally:
        KVRows._start = SHARED_START


def compare(a: RolloutBatch, b: RolloutBatch) -> tuple[int, float]:
    """(episodes with the same tokens, the largest |log-prob difference| of a sampled token before the episodes'
    tokens part): rounding apart (a different split of the same sums), the two sample the same, until a draw
    falls between the two roundings of a token's cumulative probability and the episodes part there."""
    same, largest = 0, 0.0
    for x, y in zip(a.episodes, b.episodes):
        n = next((k for k, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q),
                 min(len(x.token_ids), len(y.token_ids)))
        same += x.token_ids == y.token_ids
        largest = max([largest] + [abs(p - q) for p, q in zip(x.sample_logprobs[:n], y.sample_logprobs[:n])])
    return same, largest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples" / "env_secret_code.yaml"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="more key=value overrides of the configuration")
    a = ap.parse_args()
    cfg = load_config(a.config, [f"model.name={a.model}", f"threads={a.threads}", "tensorboard=false",
                                 "run_dir=/tmp/seqpg-shared-prefix-ab", *a.set])
    c = build_components(cfg, DistContext.from_env("cpu", "auto", 600))
    print(f"model {a.model}, {torch.get_num_threads()} thread(s), {cfg.sampling.prompts_per_step} prompts x "
          f"{cfg.sampling.samples_per_prompt} samples, config {a.config}", flush=True)
    starts = {"full": full_start, "distinct": distinct_start, "shared": SHARED_START}
    names = list(starts)
    times = {k: [] for k in names}
    same = {k: 0 for k in names}
    largest = 0.0
    for rep in range(a.reps + 1):  # repetition 0 warms up (caches, allocator) and is not counted
        prompts = c.stream.take(cfg.sampling.prompts_per_step)
        seeds = reset_seeds(cfg.seed, rep + 1, 0, len(prompts))
        order = names[rep % 3:] + names[:rep % 3]
        got = {name: timed(c, prompts, seeds, rep, starts[name]) for name in order}
        for k in names:
            agree, diff = compare(got[k][1], got["shared"][1])
            same[k] += agree
            largest = max(largest, diff)
        print(f"rep {rep}{' (warm-up)' if rep == 0 else ''}: " + ", ".join(
            f"{k} {got[k][0]:.3f} s ({got[k][1].prefill_tokens} first-input tokens prefilled)" for k in order),
            flush=True)
        if rep > 0:
            for name in times:
                times[name].append(got[name][0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median(x / s for x, s in zip(times[k], times["shared"])) for k in ("full", "distinct")}
    print(f"sampling s/step, median of {a.reps}: " + ", ".join(f"{k} {med[k]:.3f}" for k in names)
          + "; per rep / shared, median: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    total = (a.reps + 1) * len(got["shared"][1].episodes)
    print("episodes with the same tokens as shared: " + ", ".join(f"{k} {same[k]}/{total}" for k in names[:-1])
          + f"; largest |log-prob difference| of a sampled token before they part: {largest:.1e}")


if __name__ == "__main__":
    main()
