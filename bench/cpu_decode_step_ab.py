"""Interleaved A/B of single decode steps: ``FastDecoder`` at git revision REV (A) against the current one (B),
SmolLM2-135M-Instruct, 16 rows (2 prompts of examples/demo.yaml x 8), fp32.

Each side has its own KV cache, prefilled alike; every step feeds both the same tokens (B's greedy choice),
alternating which steps first, and checks that their logits are equal bit for bit.  Finer than whole
sampling calls (bench/cpu_sampling_ab.py) for changes worth a few percent of a step.  Prints the median
step of each and the median and quartiles of the per-step ratio A / B.

Usage: python THIS REV THREADS [CALLS] [--model NAME] [--new-tokens N] (``--model tiny``: the tests'
in-process model, a smoke run); the AVX2 variables as in bench/cpu_sampling_ab.py.
"""
import argparse
import statistics
import sys
import time

import torch

from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.model.policy import position_ids_from_mask
from seqpg.rollout import sampling

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cpu_sampling_ab import load, old_decoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev")
    ap.add_argument("threads", type=int)
    ap.add_argument("calls", type=int, nargs="?", default=4)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or path, or tiny")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    quiet()
    rev, threads, calls = a.rev, a.threads, a.calls
    torch.set_num_threads(threads)
    prompts = task(BenchSetup().train_config())[0][:2]
    model, tok = load(a.model)
    ids_GP, mask_GP = sampling.left_pad([sampling.encode_prompt(tok, p.text) for p in prompts], tok.pad_token_id)
    G, P, n, T = ids_GP.shape[0], ids_GP.shape[1], 8, a.new_tokens
    pos_GP = position_ids_from_mask(mask_GP)
    times = {"A": [], "B": []}
    for c in range(calls):
        side = {}
        for name, cls in (("A", old_decoder(rev)), ("B", sampling.FastDecoder)):
            cache = sampling.preallocated_cache(model.config, P + T)
            with torch.no_grad():
                model.get_decoder()(input_ids=ids_GP[:, :-1], attention_mask=mask_GP[:, :-1].long(),
                                    position_ids=pos_GP[:, :-1], use_cache=True,
                                    **{sampling.CACHE_KWARG: cache})
            cache.batch_repeat_interleave(n)
            side[name] = cls(model, cache, rows=G * n)
        attn_BW = torch.zeros((G * n, P + T), dtype=torch.bool)
        attn_BW[:, :P] = mask_GP.repeat_interleave(n, 0)
        x_B1, pos_B1 = ids_GP[:, -1:].repeat_interleave(n, 0), pos_GP[:, -1:].repeat_interleave(n, 0)
        for t in range(T):
            out = {}
            for name in ("AB" if (t + c) % 2 else "BA"):
                s = time.perf_counter()
                out[name] = side[name].step(x_B1, pos_B1, attn_BW[:, :P + t])
                if t:  # the first step packs the weights
                    times[name].append(time.perf_counter() - s)
            if not torch.equal(out["A"], out["B"]):
                raise SystemExit(f"call {c} step {t}: logits differ by {(out['A'] - out['B']).abs().max():.3g}")
            attn_BW[:, P + t] = True
            x_B1, pos_B1 = out["B"].argmax(-1, keepdim=True), pos_B1 + 1
    ratios = sorted(a / b for a, b in zip(times["A"], times["B"]))
    q = len(ratios) // 4
    print(f"fastdecode@{rev} vs now, {torch.backends.cpu.get_cpu_capability()}, {threads} thread(s): step median "
          f"A {1e3 * statistics.median(times['A']):.2f} ms, B {1e3 * statistics.median(times['B']):.2f} ms; A/B per "
          f"step median {statistics.median(ratios):.3f} (quartiles {ratios[q]:.3f}-{ratios[-q - 1]:.3f}, "
          f"{len(ratios)} steps); logits equal bit for bit")


if __name__ == "__main__":
    main()
