"""Interleaved A/B of whole sampling calls, as the benchmark makes them: SmolLM2-135M-Instruct, the first
prompts of examples/demo.yaml, 2 prompts x 8 samples x 32 new tokens, fp32, temperature 1.

A is the decode with one change switched off (``CHANGE`` below), B the decode as it is.  Both run from
the same seed in each round, alternating which goes first, and must give the same rollout bit for bit
(tokens, masks, log-probs, texts); the script stops if they do not.  Prints the median of each and the
median and range of the per-round ratio A / B.

Usage: python THIS CHANGE THREADS [ROUNDS]; put ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment to simulate an AVX2 CPU.  CHANGE:
  leave            rows that stopped leave the decode batch (A: every row decoded to the end)
  fastdecode@REV   the decoder as it is against src/seqpg/fastdecode.py at git revision REV (A)
"""
import contextlib
import importlib.util
import statistics
import subprocess
import sys
import time

import torch

from seqpg.rollout import sampling
from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.model.loading import load_model_and_tokenizer, resolve_model


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
    """``FastDecoder`` of src/seqpg/fastdecode.py at git revision ``rev``, loaded beside the current one."""
    source = subprocess.run(["git", "show", f"{rev}:src/seqpg/fastdecode.py"], check=True, capture_output=True,
                            text=True).stdout
    spec = importlib.util.spec_from_loader(f"fastdecode_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"fastdecode@{rev}", "exec"), module.__dict__)
    return module.FastDecoder


def main() -> None:
    quiet()
    change, threads = sys.argv[1], int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    torch.set_num_threads(threads)
    cfg = BenchSetup().train_config()
    prompts_all = task(cfg)[0]
    model, tok = load_model_and_tokenizer(resolve_model(cfg.model.name), dtype=torch.float32)

    def call(r: int):
        prompts = prompts_all[2 * (r % 8):2 * (r % 8) + 2]
        s = time.perf_counter()
        b = sampling.generate(model, tok, prompts, n=8, max_new_tokens=32, generator=torch.Generator().manual_seed(r))
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
