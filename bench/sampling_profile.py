"""Where one sampling call's time goes, as the benchmark makes it: SmolLM2-135M-Instruct, the first
prompts of examples/demo.yaml, 2 prompts x 8 samples x 32 new tokens, fp32, temperature 1.

Times (perf_counter around each part, CPU so synchronous) per token step: the products by kind
(q|k|v, o, gate|up, down, LM head), the whole decoder step (the rest of it: attention, norms, rope,
embedding), choosing tokens, the per-row bookkeeping (EOS and stop strings), the prefill, and the
rest of the call (template, repacking, Python).  Also how many rows were still active at each step.
Then the same prompts through HF ``generate`` as TRL calls it (``do_sample``, top_k 0, top_p 1),
timed whole.  Usage: python THIS THREADS [CALLS] [--model NAME] [--new-tokens N] (``--model tiny``:
the tests' in-process model, a smoke run); put ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment to simulate an AVX2 CPU.
"""
import argparse
import collections
import statistics
import time

import torch

from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.config import ModelConfig
from seqpg.rollout import fastdecode, sampling
from seqpg.training.build import build_policy

t = collections.defaultdict(float)
active_per_step: list[int] = []


def timed(name, f):
    def wrapper(*a, **k):
        s = time.perf_counter()
        out = f(*a, **k)
        t[name] += time.perf_counter() - s
        return out
    return wrapper


def instrument(model) -> None:
    """Wrap the decoder's products, its step, the repacking, token choice, the rows' bookkeeping and the prefill."""
    orig_linear = fastdecode.FastDecoder.linear

    def linear(self, x, *mods):
        s = time.perf_counter()
        out = orig_linear(self, x, *mods)
        name = {3: "q|k|v", 2: "gate|up"}.get(len(mods))
        if name is None:
            m = mods[0]
            name = "head" if m is self.model.lm_head else ("o" if m.in_features == m.out_features else "down")
        t["product " + name] += time.perf_counter() - s
        return out

    fastdecode.FastDecoder.linear = linear
    fastdecode.FastDecoder.step = timed("decoder step", fastdecode.FastDecoder.step)
    fastdecode.FastDecoder._weights = timed("repack", fastdecode.FastDecoder._weights)
    sampling.choose_tokens = timed("choose tokens", sampling.choose_tokens)
    orig_append = sampling._Rows.append

    def append(self, token_B, logprob_B, active_B, eos):
        active_per_step.append(int(active_B.sum()))
        return orig_append(self, token_B, logprob_B, active_B, eos)

    sampling._Rows.append = timed("rows (EOS, stop strings)", append)
    trunk_cls = type(model.get_decoder())
    trunk_cls.forward = timed("prefill", trunk_cls.forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("threads", type=int)
    ap.add_argument("calls", type=int, nargs="?", default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or path, or tiny")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    quiet()
    torch.set_num_threads(a.threads)
    prompts = task(BenchSetup().train_config())[0][:2]
    model, tok = build_policy(ModelConfig(name=a.model), seed=0, device=torch.device("cpu"))
    model.eval()
    instrument(model)
    gen = torch.Generator().manual_seed(0)
    totals = []
    for c in range(a.calls + 1):
        t.clear()
        active_per_step.clear()
        s = time.perf_counter()
        sampling.generate(model, tok, prompts, n=8, max_new_tokens=a.new_tokens, generator=gen)
        total = time.perf_counter() - s
        if c == 0:
            continue  # warm-up
        totals.append(total)
        n = len(active_per_step)
        prods = sum(v for k, v in t.items() if k.startswith("product"))
        print(f"call {c}: {total * 1000:.0f} ms, {n} steps, active rows per step {active_per_step}")
        for k in sorted(t):
            print(f"  {k:28s} {t[k] * 1000:8.1f} ms  {t[k] * 1000 / n:7.2f} ms/step")
        print(f"  {'decoder step less products':28s} {(t['decoder step'] - prods) * 1000:8.1f} ms  "
              f"{(t['decoder step'] - prods) * 1000 / n:7.2f} ms/step")
        rest = total - t["decoder step"] - t["choose tokens"] - t["rows (EOS, stop strings)"] - t["prefill"]
        print(f"  {'rest of the call':28s} {rest * 1000:8.1f} ms")
    print(f"seqpg sampling: median {statistics.median(totals) * 1000:.0f} ms over {a.calls} calls")

    # TRL's sampling: HF generate on the padded prompts (TRL's _generate, transformers paged=False path)
    ids, mask = sampling.left_pad([sampling.encode_prompt(tok, p.text) for p in prompts], tok.pad_token_id)
    ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0).long()
    hf = []
    for c in range(a.calls + 1):
        torch.manual_seed(c)
        s = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=a.new_tokens,
                                 top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id)
        if c:
            hf.append(time.perf_counter() - s)
    print(f"HF generate: median {statistics.median(hf) * 1000:.0f} ms over {a.calls} calls, "
          f"{out.shape[1] - ids.shape[1]} steps in the last")


if __name__ == "__main__":
    main()
