"""`seqpg bench` / `make bench`: seqpg's GRPO against TRL's ``GRPOTrainer``, step for step, same machine.

Both libraries run in their own worker process (so each one's peak resident memory is its own),
load the same SmolLM2-135M-Instruct weights, and get the same prompts in the same order: step k
uses training prompts 2k and 2k+1 of the configuration's task (default ``examples/demo.yaml``),
8 samples each, at most 32 new tokens, temperature 1, the configuration's learning rate, fused
AdamW (TRL's default optimizer; betas 0.9/0.999, no weight decay), clipping at norm 1, constant
learning rate, no KL term, one optimizer step per batch (no second forward pass for "old"
log-probs in either: TRL skips it in this setting, seqpg takes them from the sampler), the same
rewards (seqpg's scorers, called from a TRL reward function), no gradient checkpointing (TRL's
default is on), and the same torch thread count.  The parent tells the workers to step in turn,
TRL then seqpg, so that load from other processes on the machine falls on both alike; the first
``warmup`` steps of each are not measured.

Phases and where each starts and ends:

===================  ===========================================  =========================================
phase                TRL (wrapped methods; callbacks)              seqpg (the calls ``seqpg train`` makes)
===================  ===========================================  =========================================
sampling             ``_generate`` (template, ``generate``,        ``sampling.generate`` (template, KV-cache
                     decoding to text)                             decode loop, decoding to text)
scoring              rest of ``_generate_and_score_completions``   ``score_batch`` + ``compute_advantages``
                     (padding, rewards, advantages, metrics)
log-prob forward     ``compute_loss`` (forward, log-probs, loss)   ``update`` until ``Tensor.backward``
backward             ``accelerator.backward``                      ``Tensor.backward``
optimizer step       end of backward -> ``on_step_end`` (clip,     end of backward -> end of ``update``
                     ``optimizer.step``, scheduler, zero_grad)     (clip, ``optimizer.step``)
step                 ``on_step_begin`` -> ``on_step_end``          start of sampling -> end of ``update``
===================  ===========================================  =========================================

bf16: both keep float32 master weights.  TRL (``bf16=True``) autocasts its training forward and
samples in float32 (its generation runs outside autocast); seqpg autocasts sampling and training.
Peak memory is each worker's ``VmHWM`` over the measured steps (reset after the warm-up).  Model
FLOPs utilisation of the training phase (log-prob forward + backward + optimizer step) is
:mod:`seqpg.model.flops`'s count of the FLOPs each library's layout needs, over the phase's seconds,
over the matmul peak measured in the same run with the same thread count (the higher of two
measurements, before and after the steps).

Sampling is held against its memory-bandwidth floor (:mod:`.floor`): the bytes each library's decode
steps must read for the tokens it generated (every weight at the dtype its decode reads, the KV cache
at each step's length), over the read bandwidth measured in the same run with the same thread count
(the higher of two measurements, before and after the steps).

Modules: :mod:`.common` (settings, task, clocks, memory), :mod:`.workers` (the two sides), :mod:`.floor`
(bytes per decode step, memory bandwidth),
:mod:`.compare` (stepping, summaries), :mod:`.report` (markdown), :mod:`.learning` (``--learning``).
"""

from __future__ import annotations

import os
from dataclasses import asdict

from .common import DTYPES, BenchSetup, quiet
from .compare import headline, machine_info, measure_bandwidth, measure_peak, run_pair, summarise
from .report import markdown, write_report


def _check_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError as e:
        raise SystemExit("seqpg bench needs TRL: pip install -e '.[bench]'  (or: make bench)") from e


def run_bench(steps: int | None = None, out_dir: str = "bench", dtypes=None, threads=None, warmup: int | None = None,
              config: str = "examples/demo.yaml", overrides: list[str] | None = None, learning: bool = False,
              learning_steps: int = 20, device: str = "cpu") -> int:
    """Run the side-by-side benchmark and write ``latest.json`` and ``latest.md`` to ``out_dir``
    (with ``learning``: the learning comparison, ``learning.json`` and ``learning.md``).
    ``device`` cuda: both libraries train on the GPU, and the matmul peak is the GPU's.
    None: the default (steps 6, warmup 3, dtypes fp32 and bf16, threads 1 and 2; with ``learning``
    one thread). ``learning`` trains fp32 for ``learning_steps``: giving it steps, warmup or dtypes,
    or more than one thread count, is refused rather than ignored."""
    if learning:
        unused = [f"--{name}" for name, value in (("steps", steps), ("warmup", warmup), ("dtypes", dtypes))
                  if value is not None]
        if unused or (threads is not None and len(threads) != 1):
            raise SystemExit(f"seqpg bench --learning: {', '.join(unused) or '--threads with several counts'} "
                             "does not apply: the learning comparison trains --learning-steps steps in fp32 at one "
                             "--threads count")
    steps, warmup = 6 if steps is None else steps, 3 if warmup is None else warmup
    dtypes, threads = dtypes or ("fp32", "bf16"), threads or ((1,) if learning else (1, 2))
    if warmup < 0 or steps < 1:
        raise SystemExit(f"seqpg bench: need --warmup >= 0 and --steps >= 1, got {warmup} and {steps}")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"seqpg bench: --device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("seqpg bench: --device cuda, but no CUDA device is visible")
    _check_trl()
    quiet()
    if learning:
        from .learning import run_learning
        return run_learning(config=config, overrides=overrides, out_dir=out_dir, steps=learning_steps,
                            threads=threads[0], device=device)
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise SystemExit(f"seqpg bench: unknown dtypes {unknown}; valid: {', '.join(DTYPES)}")
    base = BenchSetup(config=config, overrides=list(overrides or []), steps=steps, warmup=warmup, device=device)
    cfg = base.train_config()
    report = {"machine": machine_info(device), "setup": asdict(base), "lr": cfg.optim.lr,
              "sampling": asdict(cfg.sampling), "runs": []}
    m = report["machine"]
    where = f"{m['gpu']} + " if device == "cuda" else ""
    print(f"seqpg bench: {where}{m['cpu_model']}, {m['logical_cpus']} CPUs, TRL {m['trl']}; {config}; {warmup} warm-up + "
          f"{steps} measured steps per library, dtypes {list(dtypes)}, threads {list(threads)}", flush=True)
    for dtype in dtypes:
        for n_threads in threads:
            s = BenchSetup(config=config, overrides=base.overrides, dtype=dtype, threads=n_threads, steps=steps,
                           warmup=warmup, device=device)
            before, bw_before = measure_peak(dtype, n_threads, device), measure_bandwidth(n_threads, device)
            raw = run_pair(s, log=lambda line: print(line, flush=True))
            after, bw_after = measure_peak(dtype, n_threads, device), measure_bandwidth(n_threads, device)
            peak = {**max(before, after, key=lambda p: p["flops_per_s"]),  # the higher peaks: the lower MFU
                    "flops_per_cpu_s": max(before["flops_per_cpu_s"], after["flops_per_cpu_s"])}
            bandwidth = max(bw_before, bw_after, key=lambda b: b["read_bytes_per_s"])  # likewise: the lower share
            summary = summarise(raw, peak, bandwidth)
            report["runs"].append({"dtype": dtype, "threads": n_threads, "summary": summary, "raw": raw,
                                   "peaks_measured": [before, after], "bandwidths_measured": [bw_before, bw_after]})
            mine, trl = summary["libraries"]["seqpg"], summary["libraries"]["trl"]
            print(f"  -> {dtype}, {n_threads} thread(s): seqpg {summary['speedup']:.2f}x faster per step; training "
                  f"phase at {100 * mine['mfu_training']:.1f}% of the matmul peak, sampling at "
                  f"{100 * mine['sampling_floor_share']:.1f}% of its bandwidth floor's speed (TRL: "
                  f"{100 * trl['mfu_training']:.1f}%, {100 * trl['sampling_floor_share']:.1f}%)", flush=True)
    report.update(headline(report["runs"]))
    report["machine"]["load_average_at_end"] = os.getloadavg()
    write_report(out_dir, "latest", report, markdown)
    return 0


__all__ = ["BenchSetup", "run_bench", "run_pair", "summarise", "headline", "markdown"]
