"""Speed of a multi-turn training step vs a single-turn step of about the same token count, A/B interleaved.

    PYTHONPATH=src python bench/episode_speed_ab.py [--model smollm2-135m-instruct] [--reps 3]
    (--model tiny --turn-tokens 4 --reps 1 --max-episode-tokens 256: a smoke run)

A: single-turn, each completion up to 3T tokens, of the same prompts ("Write a long story about X.").  B: 3-turn episodes (StoryEnv below: "continue"), each
turn up to T tokens; the environment's tokens are context.  C: B with `sampling.fast_decode=false` (the
multi-turn sampler's one-token steps through the model's own forward).  The same policy, prompts and step stages
(sample -> score -> judge -> update, grpo) in one process, alternating A and B; each step's time, its
model (action) tokens and its span tokens (actions + context) are printed, then the medians and the
ratio of model tokens per second (B / A).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from seqpg.config import load_config
from seqpg.training.build import build_components, build_scorers
from seqpg.training.distributed import DistContext
from seqpg.training.step import StepSettings, judge, sample, score
from seqpg.training.update import update

HERE = Path(__file__).resolve()


class StoryEnv:
    """The prompt (a request for a long story), then twice "Continue the story."; reward: the turn's length / 100."""

    def reset(self, prompt, seed):
        return prompt.text

    def step(self, model_text):
        self.k = getattr(self, "k", 0) + 1
        done = self.k >= 3
        return (None if done else "Continue the story."), len(model_text) / 100, done, {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--turn-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-episode-tokens", type=int, default=1024)
    a = ap.parse_args()
    T = a.turn_tokens
    topics = ["the ocean", "a lighthouse", "a lost cat", "a rainy city", "a dragon", "a robot", "a old map",
              "a train journey", "a winter forest", "a small bakery"] * 6
    scratch = Path(tempfile.mkdtemp(prefix="seqpg-episode-speed-"))
    prompts = scratch / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Write a long story about {t}."}}\n' for t in topics))
    common = [f"model.name={a.model}", "task.source=jsonl", f"task.name={prompts}",
              "task.train_size=60", "task.eval_size=4", "sampling.prompts_per_step=2", "sampling.samples_per_prompt=4",
              "algo.name=grpo", "optim.lr=1e-9", "tensorboard=false", f"threads={a.threads}", f"run_dir={scratch / 'run'}",
              "rewards=[{kind: length, weight: 0.01}]"]
    single = load_config(None, common + [f"sampling.max_new_tokens={3 * T}"])
    multi = load_config(None, common + [f"sampling.max_new_tokens={T}", "rewards=[]",
                                        f"episode.env={HERE}:StoryEnv", "episode.max_turns=3",
                                        f"episode.max_episode_tokens={a.max_episode_tokens}"])
    c = build_components(multi, DistContext.from_env("cpu", "auto", 600))
    plain = dataclasses.replace(c.settings, rollouts=dataclasses.replace(
        c.settings.rollouts, sampling=dataclasses.replace(c.settings.sample, fast_decode=False)))
    settings = {"single": StepSettings.from_config(single), "multi": c.settings, "plain": plain}
    scorers = {"single": build_scorers(single.rewards), "multi": c.scorers, "plain": c.scorers}
    out = {k: [] for k in settings}
    for rep in range(a.reps):
        for name, st in settings.items():
            prompts = c.stream.take(2)
            t0 = time.perf_counter()
            rollout = sample(c.policy, c.tokenizer, prompts, st, step=rep + 1)
            t1 = time.perf_counter()
            scored = score(c.policy, c.tokenizer, rollout, prompts, scorers[name], st)
            judged = judge(rollout, scored, st, kl_coef=0.0, policy=c.policy)
            t2 = time.perf_counter()
            update(c.policy, c.optimizer, judged.train_batch(rollout, st), st.update, max_len=st.max_completion_tokens)
            t3 = time.perf_counter()
            acts, span = int(rollout.completion_lengths_B.sum()), int(rollout.span_lengths_B.sum())
            out[name].append((t3 - t0, t1 - t0, t3 - t2, acts, span))
            print(f"{name:6s} rep {rep}: step {t3 - t0:6.2f} s (sample {t1 - t0:5.2f}, update {t3 - t2:5.2f}); "
                  f"model tokens {acts}, span tokens {span}, model tokens/s {acts / (t3 - t0):6.1f}", flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in range(5)] for k, v in out.items()}
    for k, (step, samp, upd, acts, span) in med.items():
        print(f"median {k:6s}: step {step:.2f} s, sample {samp:.2f} s, update {upd:.2f} s, model tokens {acts:.0f}, "
              f"span {span:.0f}, model tokens/s {acts / step:.1f}")
    ratio = statistics.median(m[3] / m[0] for m in out["multi"]) / statistics.median(s[3] / s[0] for s in out["single"])
    print(f"model tokens/s, multi-turn / single-turn: {ratio:.2f}")
    fast = statistics.median(p[1] / m[1] for m, p in zip(out["multi"], out["plain"]))
    print(f"multi-turn sampling, model's forward / fast decoder (per rep, median): {fast:.2f}x")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
