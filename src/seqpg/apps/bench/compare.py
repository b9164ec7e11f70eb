"""The parent side: start both workers, step them in turn, and summarise what they report."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import statistics
import subprocess

import torch

from .common import PHASES, TRAINING_PHASES, BenchSetup
from .floor import memory_bandwidth
from .workers import worker

SIDES = ("trl", "seqpg")
"""Stepping order within each round: TRL, then seqpg."""


class _Worker:
    """One side's process and the pipe to it."""

    def __init__(self, name: str, s: BenchSetup) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(name, child, s), name=f"seqpg-bench-{name}", daemon=True)
        self.proc.start()
        child.close()

    def ask(self, msg: str | None, timeout: float = 3600.0):
        if msg is not None:
            self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"bench: the {self.name} worker gave no answer in {timeout:.0f} s")
        try:
            return self.conn.recv()
        except EOFError as e:
            raise RuntimeError(f"bench: the {self.name} worker died (exit code {self.proc.exitcode}); "
                               "its error is printed above") from e

    def close(self) -> None:
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()


def run_pair(s: BenchSetup, log=print) -> dict:
    """Both sides, stepped in turn for ``s.total_steps`` rounds; their records, peak memory and first evaluation."""
    workers = {name: _Worker(name, s) for name in SIDES}
    try:
        initial_eval = {}
        for name, w in workers.items():
            hello = w.ask(None)
            if not isinstance(hello, dict) or not hello.get("ready"):
                raise RuntimeError(f"bench: the {name} worker did not start")
            initial_eval[name] = hello["eval"]
        steps: dict[str, list[dict]] = {name: [] for name in workers}
        for k in range(s.total_steps):
            if k == s.warmup:  # peak memory counts the measured steps only
                for w in workers.values():
                    w.conn.send("reset_peak")
            for name, w in workers.items():
                rec = dict(w.ask("step"), warmup=k < s.warmup)
                steps[name].append(rec)
                log(f"  {s.dtype} threads={s.threads} step {k + 1}/{s.total_steps} {name:5s} {rec['step']:6.2f} s "
                    f"(sampling {rec['sampling']:.2f}, training {sum(rec[p] for p in TRAINING_PHASES):.2f})"
                    + ("  [warm-up]" if rec["warmup"] else ""))
        finals = {name: w.ask("finish") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    return {"steps": steps, "peak_rss_mib": {name: f["peak_rss_mib"] for name, f in finals.items()},
            "peak_gpu_mib": {name: f.get("peak_gpu_mib") for name, f in finals.items()}, "initial_eval": initial_eval}


def summarise(raw: dict, peak: dict, bandwidth: dict | None = None) -> dict:
    """Medians per phase and side (wall-clock and CPU seconds), ratios seqpg / TRL, tokens/s, memory,
    MFU of the training phase against ``peak`` (per wall-clock second and per CPU second), and, with
    ``bandwidth`` (:func:`.floor.memory_bandwidth`), the sampling phase against its bandwidth floor:
    the floor's seconds (the step's ``sampling_bytes`` over the read bandwidth) and its share of the phase's."""
    out: dict = {"libraries": {}}
    for name, recs in raw["steps"].items():
        measured = [r for r in recs if not r["warmup"]]
        flops = [r["train_flops"] for r in measured]

        def mfu(seconds: list[float], peak_flops: float) -> float:
            return statistics.median(f / t for f, t in zip(flops, seconds)) / peak_flops

        out["libraries"][name] = {
            "median_s": {p: statistics.median(r[p] for r in measured) for p in PHASES},
            "median_cpu_s": {p: statistics.median(r["cpu"][p] for r in measured) for p in PHASES},
            "completion_tokens_per_s": statistics.median(r["completion_tokens"] / r["step"] for r in measured),
            "peak_rss_mib": raw["peak_rss_mib"][name],
            "peak_gpu_mib": raw.get("peak_gpu_mib", {}).get(name),
            "train_flops_per_step": statistics.median(flops),
            "mfu_training": mfu([sum(r[p] for p in TRAINING_PHASES) for r in measured], peak["flops_per_s"]),
            "mfu_forward_backward": mfu([r["logprob_forward"] + r["backward"] for r in measured], peak["flops_per_s"]),
            "mfu_training_cpu": mfu([sum(r["cpu"][p] for p in TRAINING_PHASES) for r in measured],
                                    peak["flops_per_cpu_s"]),
            "mean_reward": statistics.mean(r["reward"] for r in measured),
            "step_s": [r["step"] for r in measured],
            "threads": sorted({r["threads"] for r in measured}),
            "training_floor_s": statistics.median(flops) / peak["flops_per_s"],
        }
        if bandwidth is not None:
            floor_s = [r["sampling_bytes"] / bandwidth["read_bytes_per_s"] for r in measured]
            out["libraries"][name].update(
                sampling_bytes_per_step=statistics.median(r["sampling_bytes"] for r in measured),
                sampling_floor_s=statistics.median(floor_s),
                sampling_floor_share=statistics.median(f / r["sampling"] for f, r in zip(floor_s, measured)))
    lib = out["libraries"]
    out["ratio_seqpg_over_trl"] = {p: lib["seqpg"]["median_s"][p] / lib["trl"]["median_s"][p] for p in PHASES}
    out["speedup"] = lib["trl"]["median_s"]["step"] / lib["seqpg"]["median_s"]["step"]
    # the sides alternate, so round k's two steps ran under the same load: their ratios show the spread
    out["speedup_per_round"] = [t / s for t, s in zip(lib["trl"]["step_s"], lib["seqpg"]["step_s"])]
    out["speedup_cpu"] = lib["trl"]["median_cpu_s"]["step"] / lib["seqpg"]["median_cpu_s"]["step"]
    out["memory_ratio_seqpg_over_trl"] = lib["seqpg"]["peak_rss_mib"] / lib["trl"]["peak_rss_mib"]
    if lib["seqpg"]["peak_gpu_mib"] and lib["trl"]["peak_gpu_mib"]:
        out["gpu_memory_ratio_seqpg_over_trl"] = lib["seqpg"]["peak_gpu_mib"] / lib["trl"]["peak_gpu_mib"]
    out["matmul_peak"] = peak
    if bandwidth is not None:
        out["memory_bandwidth"] = bandwidth
    return out


def headline(runs: list[dict]) -> dict:
    """Per dtype, the run at the thread count where TRL was fastest (the fair choice for TRL)."""
    out = {}
    for dtype in ("fp32", "bf16"):
        mine = [r for r in runs if r["dtype"] == dtype]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["summary"]["libraries"]["trl"]["median_s"]["step"])
        s = best["summary"]
        out.update({f"speedup_{dtype}": s["speedup"], f"speedup_cpu_{dtype}": s["speedup_cpu"],
                    f"speedup_range_{dtype}": [min(s["speedup_per_round"]), max(s["speedup_per_round"])],
                    f"threads_{dtype}": best["threads"], f"mfu_{dtype}": s["libraries"]["seqpg"]["mfu_training"],
                    f"mfu_cpu_{dtype}": s["libraries"]["seqpg"]["mfu_training_cpu"],
                    f"memory_ratio_{dtype}": s["memory_ratio_seqpg_over_trl"]})
        if "sampling_floor_share" in s["libraries"]["seqpg"]:
            out[f"sampling_floor_share_{dtype}"] = s["libraries"]["seqpg"]["sampling_floor_share"]
        if "gpu_memory_ratio_seqpg_over_trl" in s:
            out[f"gpu_memory_ratio_{dtype}"] = s["gpu_memory_ratio_seqpg_over_trl"]
    return out


def measure_peak(dtype: str, threads: int, device: str = "cpu") -> dict:
    """The ``dtype`` matmul peak on ``device`` with ``threads`` torch threads (see ``flops.matmul_peak``)."""
    from ...model.flops import matmul_peak

    torch.set_num_threads(threads)
    r = matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], device=device)
    return {"dtype": dtype, "threads": threads, "device": device, "flops_per_s": r["flops_per_s"], "size": r["size"],
            "flops_per_cpu_s": r["flops_per_cpu_s"], "per_size": {str(k): v for k, v in r["per_size"].items()}}


def measure_bandwidth(threads: int, device: str = "cpu") -> dict:
    """The memory bandwidth on ``device`` with ``threads`` torch threads (see ``floor.memory_bandwidth``)."""
    torch.set_num_threads(threads)
    return {"threads": threads, "device": device, **memory_bandwidth(device=device)}


def machine_info(device: str = "cpu") -> dict:
    """CPU model (``lscpu``), core count, the CPU's bf16 units, the GPU's name (``device`` cuda),
    library versions, load average."""
    import transformers

    info = {"cpu_model": platform.processor() or "unknown", "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", info["cpu_model"]).strip()
        flags = fields.get("Flags", "").split()
        info["bf16_flags"] = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, subprocess.CalledProcessError):
        info["bf16_flags"] = []
    info["device"] = device
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import trl
        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info
