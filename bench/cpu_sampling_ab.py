"""Interleaved A/B of whole sampling calls, as the benchmark makes them: SmolLM2-135M-Instruct, the first
prompts of examples/demo.yaml, 2 prompts x 8 samples x 32 new tokens, fp32, temperature 1.

A is the decode with one change switched off (``CHANGE`` below), B the decode as it is.  Both run from
the same seed in each round, alternating which goes first, and must give the same rollout bit for bit
(tokens, masks, log-probs, texts); the script stops if they do not.  Prints the median of each and the
median and range of the per-round ratio A / B.

Usage: python THIS CHANGE THREADS [ROUNDS] [--model NAME] [--new-tokens N] (``--model tiny``: the tests'
in-process model, a smoke run); put ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment to simulate an AVX2 CPU.  CHANGE:
  leave            rows that stopped leave the decode batch (A: every row decoded to the end)
  fastdecode@REV   the decoder as it is against the decoder's source at git revision REV (A)
"""
import argparse
import contextlib
import importlib.util
import statistics
import subprocess
import time

import torch

from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.config import ModelConfig
from seqpg.rollout import sampling
from seqpg.training.build import build_policy

DECODER_PATHS = ("src/seqpg/rollout/fastdecode.py", "src/seqpg/fastdecode.py")
"""Where the decoder's source lived, newest first (package ``seqpg.rollout``, before that ``seqpg``)."""


@contextlib.contextmanager
def without(change: str):
    """The decode with ``change`` switched off."""
    if change == "leave":
        saved = sampling._keep
        sampling._keep = lambda *a, **k: None
        try:
            yield
        finally:
            sampling._keep = saved
    elif change.startswith("fastdecode@"):
        saved = sampling.FastDecoder
        sampling.FastDecoder = old_decoder(change.split("@", 1)[1])
        try:
            yield
        finally:
            sampling.FastDecoder = saved
    else:
        raise SystemExit(f"unknown change {change!r}; see the docstring")


def old_decoder(rev: str):
    """``FastDecoder`` of the decoder's source at git revision ``rev`` (the first of ``DECODER_PATHS`` it has),
    loaded beside the current one, its relative imports resolved in the package it lived in then."""
    for path in DECODER_PATHS:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"revision {rev!r} has none of {', '.join(DECODER_PATHS)}")
    spec = importlib.util.spec_from_loader(f"fastdecode_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = path[len("src/"):].rsplit("/", 1)[0].replace("/", ".")
    exec(compile(shown.stdout, f"fastdecode@{rev}", "exec"), module.__dict__)
    return module.FastDecoder


def load(name: str):
    """(model, tokenizer) in float32, eval mode: a model alias or path, or ``tiny`` (the tests' model)."""
    model, tok = build_policy(ModelConfig(name=name), seed=0, device=torch.device("cpu"))
    return model.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("change")
    ap.add_argument("threads", type=int)
    ap.add_argument("rounds", type=int, nargs="?", default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or path, or tiny")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    quiet()
    change, threads, rounds = a.change, a.threads, a.rounds
    torch.set_num_threads(threads)
    prompts_all = task(BenchSetup().train_config())[0]
    model, tok = load(a.model)

    def call(r: int):
        prompts = prompts_all[2 * (r % 8):2 * (r % 8) + 2]
        s = time.perf_counter()
        b = sampling.generate(model, tok, prompts, n=8, max_new_tokens=a.new_tokens,
                              generator=torch.Generator().manual_seed(r))
        return time.perf_counter() - s, b

    call(0)  # warm-up
    times = {"A": [], "B": []}
    for r in range(rounds):
        out = {}
        for side in ("AB" if r % 2 else "BA"):
            with without(change) if side == "A" else contextlib.nullcontext():
                times[side].append(None)
                times[side][-1], out[side] = call(r)
        a, b = out["A"], out["B"]
        same = (torch.equal(a.completion_ids_BC, b.completion_ids_BC) and torch.equal(a.completion_mask_BC,
                b.completion_mask_BC) and torch.equal(a.sample_logprobs_BC, b.sample_logprobs_BC)
                and a.completions == b.completions)
        if not same:
            raise SystemExit(f"round {r}: A and B differ: max |dlogprob| "
                             f"{(a.sample_logprobs_BC - b.sample_logprobs_BC).abs().max():.3g}")
        print(f"round {r}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s, "
              f"{int(b.completion_mask_BC.sum())} tokens", flush=True)
    ratios = [x / y for x, y in zip(times["A"], times["B"])]
    print(f"{change}, {torch.backends.cpu.get_cpu_capability()}, {threads} thread(s): A median "
          f"{statistics.median(times['A']):.3f} s, B median {statistics.median(times['B']):.3f} s; A/B per round "
          f"median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); identical rollouts")


if __name__ == "__main__":
    main()
