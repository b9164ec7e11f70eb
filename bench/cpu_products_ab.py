"""Interleaved A/B: one decode token's products for SmolLM2-135M (30 layers + LM head), 16 rows, fp32:
oneDNN-packed (_linear_pointwise) vs F.linear. Prints ms per token and the ratio per round. Usage: python THIS THREADS"""
import statistics, sys, time
import torch
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
E, I, V, L, B = 576, 1536, 49152, 30, 16
shapes = [(E + 2 * 192, E), (E, E), (2 * I, E), (E, I)]  # q|k|v, o, gate|up, down
layers = [[torch.randn(n, k) * 0.02 for n, k in shapes] for _ in range(L)]
head = torch.randn(V, E) * 0.02
packed = [[torch.ops.mkldnn._reorder_linear_weight(w, B) for w in ws] for ws in layers]
head_p = torch.ops.mkldnn._reorder_linear_weight(head, B)
xs = {k: torch.randn(B, k) for k in (E, I)}
def run_packed():
    for ws in packed:
        for w, (n, k) in zip(ws, shapes):
            torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")
    torch.ops.mkldnn._linear_pointwise(xs[E], head_p, None, "none", [], "")
def run_plain():
    for ws in layers:
        for w, (n, k) in zip(ws, shapes):
            torch.nn.functional.linear(xs[k], w)
    torch.nn.functional.linear(xs[E], head)
t = {"packed": [], "plain": []}
for r in range(12):
    for name, f in ((("packed", run_packed), ("plain", run_plain)) if r % 2 else (("plain", run_plain), ("packed", run_packed))):
        s = time.perf_counter(); f(); t[name].append(1000 * (time.perf_counter() - s))
t = {k: v[2:] for k, v in t.items()}
print(torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads(),
      {k: round(statistics.median(v), 1) for k, v in t.items()}, "ms/token; plain/packed median of rounds",
      round(statistics.median([b / a for a, b in zip(t["packed"], t["plain"])]), 2))
