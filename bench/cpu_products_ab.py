"""Interleaved A/B of one decode token's products for SmolLM2-135M (30 layers + LM head, 16 rows):
fp32 oneDNN-packed (``_linear_pointwise``, what the fast decoder runs) against B, where B is

    fp32  plain fp32 ``F.linear`` (what runs without oneDNN's prepacked linear)      [default]
    bf16  bf16 ``F.linear`` (the fallback where oneDNN cannot run bf16)

Usage: python bench/cpu_products_ab.py THREADS [fp32|bf16] [--layers 30] [--rounds 12]
(--layers 1 --rounds 4: a smoke run). Prints ms per token of each and the median over rounds of B / packed."""
import argparse
import statistics
import time

import torch

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("threads", type=int)
ap.add_argument("other", nargs="?", default="fp32", choices=("fp32", "bf16"))
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--rounds", type=int, default=12, help="rounds of each; the first 2 are not measured")
a = ap.parse_args()
torch.manual_seed(0)
torch.set_num_threads(a.threads)
other = a.other
E, I, V, L, B = 576, 1536, 49152, a.layers, 16
shapes = [(E + 2 * 192, E), (E, E), (2 * I, E), (E, I)]  # q|k|v, o, gate|up, down
layers = [[torch.randn(n, k) * 0.02 for n, k in shapes] for _ in range(L)]
head = torch.randn(V, E) * 0.02
packed = [[torch.ops.mkldnn._reorder_linear_weight(w, B) for w in ws] for ws in layers]
head_p = torch.ops.mkldnn._reorder_linear_weight(head, B)
xs = {k: torch.randn(B, k) for k in (E, I)}
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[other]
plain = [[w.to(dtype) for w in ws] for ws in layers]
head_plain, xs_plain = head.to(dtype), {k: v.to(dtype) for k, v in xs.items()}


def run_packed():
    for ws in packed:
        for w, (n, k) in zip(ws, shapes):
            torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")
    torch.ops.mkldnn._linear_pointwise(xs[E], head_p, None, "none", [], "")


def run_plain():
    for ws in plain:
        for w, (n, k) in zip(ws, shapes):
            torch.nn.functional.linear(xs_plain[k], w)
    torch.nn.functional.linear(xs_plain[E], head_plain)


t = {"packed": [], other: []}
for r in range(max(a.rounds, 3)):
    order = (("packed", run_packed), (other, run_plain))
    for name, f in (order if r % 2 else order[::-1]):
        s = time.perf_counter()
        f()
        t[name].append(1000 * (time.perf_counter() - s))
t = {k: v[2:] for k, v in t.items()}
print(torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads(),
      {k: round(statistics.median(v), 1) for k, v in t.items()}, f"ms/token; {other}/packed median of rounds",
      round(statistics.median([b / a for a, b in zip(t["packed"], t[other])]), 2))
