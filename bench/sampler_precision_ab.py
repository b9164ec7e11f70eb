"""The sampler in float32, bf16 and int8 (``sampling.dtype``), side by side in one process: the time of whole
sampling calls, and how far each sampler's log-probs are from the float32 training forward's on its own tokens
(the mismatch a run logs at step 0, ``mismatch/*``, with the TIS cap ``--cap``).

SmolLM2-135M-Instruct by default, the first prompts of the benchmark's task, 2 prompts x 8 samples x 32 new
tokens, temperature 1, float32 master weights.  Each round samples the same prompts from the same seed with
every sampler, the order rotating from round to round; prints the median time of each (a call's seconds over
its decode steps), the median and range of the per-round ratio float32 / other, the mismatch statistics over
all rounds' samples, and the time of the float32 training forward over the samples (the step's extra pass
when the sampler's precision differs, ``time/sampler_check``), on the same per-decode-step scale.

Usage: python THIS [ROUNDS] [--threads N] [--model NAME] [--new-tokens N] [--cap C] (``--model tiny``: the
tests' in-process model, a smoke run).  Pin it to one core (``taskset -c 1``) for timings.
"""
import argparse
import statistics
import time

import torch

from seqpg import core
from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.config import ModelConfig
from seqpg.model.policy import completion_logprobs
from seqpg.rollout import cpu_caps
from seqpg.rollout.sampling import SampleSettings
from seqpg.training.build import build_policy

SAMPLERS = (None, "bfloat16", "int8")
"""``sampling.dtype`` of each side; None: the float32 sampler (the trainer's precision)."""


def name(dtype: str | None) -> str:
    return dtype or "float32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rounds", type=int, nargs="?", default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or path, or tiny")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cap", type=float, default=2.0, help="the TIS cap whose truncated fraction is reported")
    a = ap.parse_args()
    quiet()
    torch.set_num_threads(a.threads)
    prompts_all = task(BenchSetup().train_config())[0]
    model, tok = build_policy(ModelConfig(name=a.model), seed=0, device=torch.device("cpu"))
    model.eval()

    def call(dtype: str | None, r: int):
        s = SampleSettings(max_new_tokens=a.new_tokens, dtype=dtype)
        prompts = prompts_all[2 * (r % 8):2 * (r % 8) + 2]
        t0 = time.perf_counter()
        batch = s.generate(model, tok, prompts, n=8, generator=torch.Generator().manual_seed(r))
        return time.perf_counter() - t0, batch

    for dtype in SAMPLERS:
        call(dtype, 0)  # warm-up
    times: dict[str | None, list[float]] = {d: [] for d in SAMPLERS}
    stats: dict[str | None, list[core.MismatchStats]] = {d: [] for d in SAMPLERS}
    checks: list[float] = []  # the training forward over a batch, per decode step of its call
    for r in range(a.rounds):
        order = SAMPLERS[r % 3:] + SAMPLERS[:r % 3]
        for dtype in order:
            seconds, batch = call(dtype, r)
            steps = max(int(batch.completion_mask_BC.any(0).sum()), 1)
            times[dtype].append(seconds / steps)
            t0 = time.perf_counter()
            with torch.no_grad():
                train_BC = completion_logprobs(model, batch).logprobs_BC * batch.completion_mask_BC
            checks.append((time.perf_counter() - t0) / steps)
            tis = core.sampler_correction("tis", train_BC, batch.sample_logprobs_BC, batch.completion_mask_BC,
                                          cap=a.cap)
            stats[dtype].append(core.mismatch_stats(train_BC, batch.sample_logprobs_BC, batch.completion_mask_BC,
                                                    truncated=tis.truncated_BT))
        print(f"round {r}: " + ", ".join(f"{name(d)} {1e3 * times[d][-1]:.1f} ms/step" for d in SAMPLERS), flush=True)
    print(f"{a.model}, {torch.backends.cpu.get_cpu_capability()}, onednn_bf16={cpu_caps.onednn_bf16()}, "
          f"native_bf16={cpu_caps.native_bf16()}, {a.threads} thread(s), {a.rounds} rounds, 2 x 8 rows:")
    base = times[None]
    for d in SAMPLERS:
        ratios = [x / y for x, y in zip(base, times[d])]
        pooled = core.MismatchStats(*(torch.stack([getattr(s, f) for s in stats[d]]).sum() for f in
                                      ("num_tokens", "kl_sum", "log_ratio_sum", "truncated_sum")),
                                    max_abs_log_ratio=torch.stack([s.max_abs_log_ratio for s in stats[d]]).max())
        m = pooled.means()
        print(f"  {name(d):8s} median {1e3 * statistics.median(times[d]):7.1f} ms per decode step; float32/this "
              f"per round median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
              f"vs the float32 training forward: kl {m['mismatch/kl']:.3g}, ppl_ratio {m['mismatch/ppl_ratio']:.4f}, "
              f"max |dlogp| {m['mismatch/max_abs_logp_diff']:.3g}, past cap {a.cap:g} "
              f"{m['mismatch/truncated_frac']:.4f} ({int(pooled.num_tokens)} tokens)")
    print(f"  the float32 training forward over a call's samples (the extra pass): median "
          f"{1e3 * statistics.median(checks):.1f} ms per decode step of the call")
    print("sampler precision A/B done")


if __name__ == "__main__":
    main()
