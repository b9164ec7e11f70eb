"""A/B of seqpg's GPU code paths on the real model, interleaved in one process (medians).

    python bench/gpu_ab.py [--rounds 7] [--out gpu_ab.json] [--model NAME]   (--model tiny: a smoke run)

Sampling (2 prompts x 8 samples, 32 new tokens, the demo's first prompts): the fast decoder
with its CUDA graph (default), without it, and the model's own forward.  Update (one GRPO update
of that batch; AdamW with lr 0, so every round sees the same weights): the shared-prompt layout
with a dense mask (the GPU default), with segment attention (the CPU default), and the padded
layout.  fp32 and bf16 autocast.  Each variant's result is checked against the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from functools import partial

import torch

from seqpg import core
from seqpg.apps.bench.common import BenchSetup, task
from seqpg.config import ModelConfig
from seqpg.model import policy, segment_attention
from seqpg.rollout import fastdecode, sampling
from seqpg.training.build import build_policy
from seqpg.training.update import TrainBatch, UpdateSettings, update


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="gpu_ab.json")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or path, or tiny")
    args = ap.parse_args()
    prompts, _, _ = task(BenchSetup().train_config())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this script
    model, tok = build_policy(ModelConfig(name=args.model), seed=0, device=torch.device(device))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    results: dict = {"gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__}
    for dtype in ("fp32", "bf16"):
        bf16 = dtype == "bf16"
        amp = partial(torch.autocast, device, dtype=torch.bfloat16, enabled=bf16)

        def sample(gen_seed: int = 0, fast_decode: bool = True):
            with amp():
                return sampling.generate(model, tok, prompts[:2], n=8, max_new_tokens=32, fast_decode=fast_decode,
                                         generator=torch.Generator().manual_seed(gen_seed))

        sampling_variants = {
            "fast decode (+ CUDA graph on GPU)": lambda: sample(),
            "fast decode, no graph": lambda: _with(sampling, "FastDecoder",
                                                   partial(fastdecode.FastDecoder, graph=False), sample),
            "model's own forward": lambda: sample(fast_decode=False),
        }
        batch = sample(1)
        rewards = torch.randn(batch.batch_size, generator=torch.Generator().manual_seed(2))
        adv, ret = core.compute_advantages("grpo", rewards, batch.completion_mask_BC, group_ids=batch.group_ids_B)
        tb = TrainBatch(batch, adv, ret, batch.sample_logprobs_BC)
        s = UpdateSettings(loss="ppo", agg="seq-mean-token-mean", bf16=bf16, kl_estimator="k3", grad_noise=False,
                           kl_noise_floor=0.0)
        upd = lambda: update(model, opt, tb, s, max_len=32)  # noqa: E731
        update_variants = {
            "shared prompt, dense mask": upd,
            "shared prompt, segment attention": lambda: _with(segment_attention, "applies", _segments_on, upd),
            "padded layout": lambda: _with(policy, "shared_prompt_groups", lambda b: None, upd),
        }
        for label, variants in (("sampling", sampling_variants), ("update", update_variants)):
            times = {k: [] for k in variants}
            outs = {}
            for r in range(args.rounds + 1):  # round 0: warm-up
                for k, fn in variants.items():
                    t, out = timed(fn)
                    if r:
                        times[k].append(t)
                    outs[k] = out
            first = next(iter(variants))
            results[f"{dtype} {label}"] = {
                k: {"median_s": statistics.median(v), "ratio_to_first": statistics.median(v) / statistics.median(
                    times[first]), "agrees": _agree(outs[first], outs[k], label)} for k, v in times.items()}
    page = render_markdown(results)
    print(page)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(page)


def render_markdown(results: dict) -> str:
    """The A/B as tables (medians; ratio to the first variant; whether its output agrees with the first's)."""
    lines = [f"GPU A/B of the decoder's and the update's code paths: {results.get('gpu')}, torch {results.get('torch')}",
             "(`python bench/gpu_ab.py`; medians of interleaved rounds).", ""]
    for key, rows in results.items():
        if not isinstance(rows, dict):
            continue
        lines += [f"**{key}**", "", "| variant | median ms | x first | agrees with the first |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v['median_s'] * 1e3:.1f} | {v['ratio_to_first']:.2f} | {v['agrees']} |" for k, v in rows.items()]
        lines.append("")
    return "\n".join(lines)


def _segments_on(model) -> bool:
    inner = segment_attention._unwrap(model)
    return getattr(inner.config, "_attn_implementation", None) == "sdpa"


def _with(obj, name, value, fn):
    with patched(obj, name, value):
        return fn()


def _agree(a, b, label: str) -> str:
    if label == "sampling":
        C = min(a.completion_ids_BC.shape[1], b.completion_ids_BC.shape[1])
        same = (a.completion_ids_BC[:, :C] == b.completion_ids_BC[:, :C]).float().mean().item()
        return f"{100 * same:.0f}% tokens"
    return f"loss {a['loss']:.5f} vs {b['loss']:.5f}"


if __name__ == "__main__":
    main()
