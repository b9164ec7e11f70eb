"""How far apart the sampler's, the policy's and the reference's log-probs of the same tokens are at step 0,
when all three are the same weights: the numerical floor under any KL estimate (issue: flat groups).

For each precision (fp32; bf16 autocast) the script samples ``--prompts`` x ``--samples`` completions with the
run's sampler (the fast decoder unless ``--no-fast-decode``), then computes the completion tokens' log-probs
with the trainer's layouts (shared-prompt packing and plain padding) and with the reference policy (a frozen
copy, as a run keeps one), and prints the largest and the 99.9th-percentile |delta log pi| per token of every
pair. Usage: python bench/logprob_disagreement.py [--model smollm2-135m-instruct | --tiny] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from seqpg.batch import Prompt
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer, resolve_model
from seqpg.model.policy import _padded_logprobs, completion_logprobs
from seqpg.rollout.sampling import SampleSettings
from seqpg.training.precision import autocast
from seqpg.training.reference import ReferencePolicy


def disagreement(model, tokenizer, prompts: list[Prompt], *, n: int, max_new_tokens: int, bf16: bool,
                 fast_decode: bool, chat_template: bool, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{pair: (max, p99.9)} of |delta log pi| over the completion tokens, for sampler / packed / padded / reference."""
    sample = SampleSettings(max_new_tokens=max_new_tokens, chat_template=chat_template, fast_decode=fast_decode)
    reference = ReferencePolicy(model)
    with torch.no_grad(), autocast("cpu", bf16):
        rollout = sample.generate(model, tokenizer, prompts, n=n, generator=torch.Generator().manual_seed(seed))
        logps = {"sampler": rollout.sample_logprobs_BC,
                 "policy (shared-prompt layout)": completion_logprobs(model, rollout).logprobs_BC,
                 "policy (padded layout)": _padded_logprobs(model, rollout, 1.0, False, False).logprobs_BC,
                 "reference": reference.logprobs(rollout)}
    mask = rollout.completion_mask_BC
    out = {}
    for (a, x), (b, y) in itertools.combinations(logps.items(), 2):
        d = (x.float() - y.float()).abs()[mask]
        out[f"{a} vs {b}"] = (float(d.max()), float(d.quantile(0.999)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; for smoke tests)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fast-decode", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.tiny:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(len(tokenizer), seed=0)
    else:
        model, tokenizer = load_model_and_tokenizer(resolve_model(a.model), dtype=torch.float32)
    model.eval()
    topics = ["the sea", "a bakery", "traffic jams", "winter", "a library", "trains", "music", "rain"]
    prompts = [Prompt(text=f"Write one sentence about {t}.", id=str(i)) for i, t in enumerate(topics[:a.prompts])]
    for bf16 in (False, True):
        res = disagreement(model, tokenizer, prompts, n=a.samples, max_new_tokens=a.max_new_tokens, bf16=bf16,
                           fast_decode=not a.no_fast_decode, chat_template=True)
        print(f"== {'bf16 autocast' if bf16 else 'fp32'}: |delta log pi| per completion token, max / 99.9th pct")
        for pair, (mx, q) in res.items():
            print(f"  {pair:60s} {mx:.3e}  {q:.3e}")


if __name__ == "__main__":
    main()
