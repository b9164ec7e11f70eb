"""Where the default noise-scale split's cost comes from, timed directly (interleaved, medians).

    PYTHONPATH=src python bench/gns_parts.py [--model NAME] [--rounds N]   (--model tiny --rounds 3: a smoke run)

1. One forward+backward over the default run's batch (the demo's first two prompts in the chat template,
   2 x 8 samples, up to 32 tokens), against two halves of 8 rows, and two halves plus the squared norm of
   the gradients after the first (what ``optim.grad_noise`` adds): 20 rounds.
2. Two rows in one backward against one row in each of two backwards (14 rounds after 2 warm-up): the
   part of a backward's cost that does not shrink with its rows.
``--rounds N``: N rounds in part 1 and N - 4 in part 2 (at least 3 each; the first 2 of each are not measured).
"""
import argparse, statistics, time, torch
from seqpg import core
from seqpg.batch import Prompt
from seqpg.config import ModelConfig
from seqpg.rollout.sampling import generate
from seqpg.training.build import build_policy
from seqpg.training.update import TrainBatch, UpdateSettings, _micro_loss
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or path, or tiny")
ap.add_argument("--rounds", type=int, default=20)
a = ap.parse_args()
rounds1, rounds2 = max(a.rounds, 3), max(a.rounds - 4, 3)
model, tok = build_policy(ModelConfig(name=a.model), seed=0, device=torch.device("cpu"))
texts = [f"Write one sentence about {t}." for t in ("books", "a bakery")]
r = generate(model, tok, [Prompt(t, str(i)) for i, t in enumerate(texts)], n=8, max_new_tokens=32, chat_template=True,
             generator=torch.Generator().manual_seed(0))
adv, ret = core.compute_advantages("grpo", torch.randn(16), r.completion_mask_BC, group_ids=r.group_ids_B)
batch = TrainBatch(r, adv, ret, r.sample_logprobs_BC)
s = UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg="seq-mean-token-mean")
params = list(model.parameters())
N, S = float(batch.mask_BC.sum()), 16.0
def fb(bounds, norm):
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter(); marks = []
    for lo, hi in bounds:
        loss, _ = _micro_loss(model, None, batch.select(torch.arange(lo, hi)), s, 0.0, N, S, batch.mask_BC.shape[1])
        loss.backward(); marks.append(time.perf_counter() - t0)
        if norm and hi < 16:
            torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
            marks.append(time.perf_counter() - t0)
    return time.perf_counter() - t0, marks
res = {"whole": [], "halves": [], "halves+norm": []}
mk = {k: [] for k in res}
for i in range(rounds1):  # part 1
    for k in (res if i % 2 else reversed(list(res))):
        t, m = fb([(0, 16)] if k == "whole" else [(0, 8), (8, 16)], k == "halves+norm")
        res[k].append(t); mk[k].append(m)
for k, v in res.items(): print(k, "%.3f" % statistics.median(v[2:]), [round(statistics.median(x[j] for x in mk[k][2:]), 3) for j in range(len(mk[k][0]))])
d = [a - b for a, b in zip(res["halves+norm"][2:], res["whole"][2:])]
print("median paired difference halves+norm - whole: %.3f s" % statistics.median(d))


# part 2: one backward of two rows against two backwards of one row
r2 = generate(model, tok, [Prompt("Write one sentence about books.", "0")], n=2, max_new_tokens=32, chat_template=True,
             generator=torch.Generator().manual_seed(0))
adv, ret = core.compute_advantages("grpo", torch.tensor([0.0, 1.0]), r2.completion_mask_BC, group_ids=r2.group_ids_B)
batch = TrainBatch(r2, adv, ret, r2.sample_logprobs_BC)

N = float(batch.mask_BC.sum())
def fb2(bounds):
    model.zero_grad(set_to_none=True); t0 = time.perf_counter()
    for lo, hi in bounds:
        loss, _ = _micro_loss(model, None, batch.select(torch.arange(lo, hi)), s, 0.0, N, 2.0, batch.mask_BC.shape[1])
        loss.backward()
    return time.perf_counter() - t0
res = {"one backward of 2 rows": [], "two backwards of 1 row": []}
for i in range(rounds2):
    for k in (res if i % 2 else reversed(list(res))):
        res[k].append(fb2([(0, 2)] if k.startswith("one") else [(0, 1), (1, 2)]))
for k, v in res.items(): print(k, "%.3f" % statistics.median(v[2:]))
print("median paired difference %.3f" % statistics.median(b - a for a, b in zip(*res.values())))
