"""Interleaved A/B: the update with the gradient-noise probe (norm of the accumulated gradient after
each micro-batch but the last) vs without it, same batch, same model, alternating order each round.
Prints the median seconds per update of each arm and the median of the per-round ratios.

Usage: python bench/gns_overhead_ab.py MODEL ROUNDS MICRO [split|default] [PROMPTS]   (MODEL: tiny or
smollm2-135m-instruct; a batch of PROMPTS (4) prompts x 8 samples, 32 new tokens, split in micro-batches of
MICRO rows). With `split`, arm B is instead the whole batch in one micro-batch (no noise scale). With
`default` (MICRO ignored), the two arms are the update as `seqpg train` runs it by default
(`optim.grad_noise=true`: one micro-batch split in two halves of whole groups, noise scale measured) and with
`optim.grad_noise=false` (one backward, no noise scale): the cost of the default measurement."""
import statistics
import sys
import time

import torch

from seqpg import core
from seqpg.batch import Prompt
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer, resolve_model
from seqpg.rollout.sampling import generate
from seqpg.training import gradnoise
from seqpg.training.update import TrainBatch, UpdateSettings, update

name, rounds, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else ""
split = mode in ("split", "default")
n_prompts = int(sys.argv[5]) if len(sys.argv) > 5 else 4
torch.manual_seed(0)
if name == "tiny":
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
else:
    model, tok = load_model_and_tokenizer(resolve_model(name))
model.train()
chat = mode == "default"  # the default run's batch: the demo's prompts in the chat template
texts = ([f"Write one sentence about {t}." for t in ("books", "a bakery", "the beach", "traffic jams")] if chat else
         ["Tell me a story.", "Describe the sea.", "A poem on rain.", "Why is the sky blue?"])
prompts = [Prompt(t, str(i)) for i, t in enumerate(texts[:n_prompts])]
r = generate(model, tok, prompts, n=8, max_new_tokens=32, chat_template=chat,
             generator=torch.Generator().manual_seed(0))
rewards = torch.randn(r.batch_size, generator=torch.Generator().manual_seed(1))
adv, ret = core.compute_advantages("grpo", rewards, r.completion_mask_BC, group_ids=r.group_ids_B)
batch = TrainBatch(r, adv, ret, r.sample_logprobs_BC)
s = UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, loss="ppo", agg="seq-mean-token-mean", micro_batch_size=0 if mode == "default" else micro,
                   grad_noise=mode == "default")
whole = UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg="seq-mean-token-mean", micro_batch_size=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-12, fused=True)
real = gradnoise.GradientNoiseProbe.after_partial_backward


def run(probe: bool) -> float:
    off = lambda self, params, rows_done: None  # noqa: E731
    gradnoise.GradientNoiseProbe.after_partial_backward = real if probe or split else off
    t0 = time.perf_counter()
    stats = update(model, opt, batch, s if probe or not split else whole)
    assert ("gns/b_simple" in stats) == probe
    return time.perf_counter() - t0


run(True), run(False)  # warm-up
times = {True: [], False: []}
for i in range(rounds):
    for probe in ((True, False) if i % 2 else (False, True)):
        times[probe].append(run(probe))
ratios = [a / b for a, b in zip(times[True], times[False])]
label = "default halves vs grad_noise=false" if mode == "default" else f"micro={micro}{' vs whole batch' if split else ''}"
print(f"{name} B={r.batch_size} C={r.completion_mask_BC.shape[1]} mean length {float(r.completion_mask_BC.sum(1).float().mean()):.1f} {label} threads={torch.get_num_threads()} rounds={rounds}: "
      f"with probe {statistics.median(times[True]):.4f} s, without {statistics.median(times[False]):.4f} s, "
      f"median ratio {statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f}), "
      f"median paired difference {statistics.median(a - b for a, b in zip(times[True], times[False])):+.4f} s")
