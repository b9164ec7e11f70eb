"""Where one sampling call's time goes, as the benchmark makes it: SmolLM2-135M-Instruct, the first
prompts of examples/demo.yaml, 2 prompts x 8 samples x 32 new tokens, fp32, temperature 1.

Times (perf_counter around each part, CPU so synchronous) per token step: the products by kind
(q|k|v, o, gate|up, down, LM head), the whole decoder step (the rest of it: attention, norms, rope,
embedding), choosing tokens, the per-row bookkeeping (EOS and stop strings), the prefill, and the
rest of the call (template, repacking, Python).  Also how many rows were still active at each step.
Then the same prompts through HF ``generate`` as TRL calls it (``do_sample``, top_k 0, top_p 1),
timed whole.  Usage: python THIS THREADS [CALLS]; put ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment to simulate an AVX2 CPU.
"""
import collections
import statistics
import sys
import time

import torch

from seqpg.rollout import fastdecode, sampling
from seqpg.apps.bench.common import BenchSetup, quiet, task
from seqpg.model.loading import load_model_and_tokenizer, resolve_model

quiet()
torch.set_num_threads(int(sys.argv[1]))
calls = int(sys.argv[2]) if len(sys.argv) > 2 else 3
cfg = BenchSetup().train_config()
prompts = task(cfg)[0][:2]
model, tok = load_model_and_tokenizer(resolve_model(cfg.model.name), dtype=torch.float32)
model.eval()
t = collections.defaultdict(float)
active_per_step: list[int] = []


def timed(name, f):
    def wrapper(*a, **k):
        s = time.perf_counter()
        out = f(*a, **k)
        t[name] += time.perf_counter() - s
        return out
    return wrapper


kinds = {1: "o|down|head", 2: "gate|up", 3: "q|k|v"}
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

gen = torch.Generator().manual_seed(0)
totals, steps = [], []
for c in range(calls + 1):
    t.clear()
    active_per_step.clear()
    s = time.perf_counter()
    batch = sampling.generate(model, tok, prompts, n=8, max_new_tokens=32, generator=gen)
    total = time.perf_counter() - s
    if c == 0:
        continue  # warm-up
    totals.append(total)
    n = len(active_per_step)
    steps.append(n)
    prods = sum(v for k, v in t.items() if k.startswith("product"))
    print(f"call {c}: {total * 1000:.0f} ms, {n} steps, active rows per step {active_per_step}")
    for k in sorted(t):
        print(f"  {k:28s} {t[k] * 1000:8.1f} ms  {t[k] * 1000 / n:7.2f} ms/step")
    print(f"  {'decoder step less products':28s} {(t['decoder step'] - prods) * 1000:8.1f} ms  "
          f"{(t['decoder step'] - prods) * 1000 / n:7.2f} ms/step")
    rest = total - t["decoder step"] - t["choose tokens"] - t["rows (EOS, stop strings)"] - t["prefill"]
    print(f"  {'rest of the call':28s} {rest * 1000:8.1f} ms")
print(f"seqpg sampling: median {statistics.median(totals) * 1000:.0f} ms over {calls} calls")

# TRL's sampling: HF generate on the padded prompts (TRL's _generate, transformers paged=False path)
from seqpg.rollout.sampling import encode_prompt, left_pad  # noqa: E402

ids, mask = left_pad([encode_prompt(tok, p.text) for p in prompts], tok.pad_token_id)
ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0).long()
hf = []
for c in range(calls + 1):
    torch.manual_seed(c)
    s = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=32, top_k=0,
                             top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id)
    if c:
        hf.append(time.perf_counter() - s)
print(f"HF generate: median {statistics.median(hf) * 1000:.0f} ms over {calls} calls, "
      f"{out.shape[1] - ids.shape[1]} steps in the last")
