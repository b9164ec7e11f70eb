"""What both benchmark workers share: the settings, the task, the clocks and the memory probe."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PHASES = ("sampling", "scoring", "logprob_forward", "backward", "optimizer", "step")
PHASE_LABELS = {"sampling": "sampling", "scoring": "scoring", "logprob_forward": "log-prob forward",
                "backward": "backward", "optimizer": "optimizer step", "step": "whole step"}
TRAINING_PHASES = ("logprob_forward", "backward", "optimizer")
DTYPES = ("fp32", "bf16")


@dataclass
class BenchSetup:
    """What one pair of workers runs.  The task, rewards, sampling settings, learning rate and seed
    come from a seqpg configuration; the algorithm is always GRPO with one update per batch."""

    config: str = "examples/demo.yaml"
    """seqpg configuration file (model, task, rewards, sampling, optim.lr, seed)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the configuration."""
    dtype: str = "fp32"
    """fp32, or bf16 (autocast with float32 master weights, in each library's own way)."""
    threads: int = 1
    """torch intra-op threads, the same for both libraries."""
    steps: int = 6
    """Measured steps per library."""
    warmup: int = 3
    """Unmeasured steps per library before them."""
    eval_every: int = 0
    """Evaluate held-out reward (greedy) before training and every N steps (0: never)."""
    device: str = "cpu"
    """cpu, or cuda: both libraries train on the GPU (TRL through accelerate, seqpg's model moved there)."""

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def train_config(self):
        """The resolved ``TrainConfig``, checked for what the benchmark supports."""
        from ...config import ConfigError, load_config

        cfg = load_config(self.config, self.overrides)
        if cfg.sampling.top_k or cfg.sampling.top_p < 1.0 or cfg.sampling.stop_strings:
            raise ConfigError("seqpg bench: top_k, top_p and stop_strings are not matched on TRL's side; "
                              "leave them at their defaults")
        return cfg


def quiet() -> None:
    """Offline, and without the libraries' progress bars and advisory warnings."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def task(cfg) -> tuple[list, list, list]:
    """(train prompts, held-out prompts, [(scorer, weight)]) of a configuration, as ``seqpg train`` builds them."""
    from ...training.build import build_prompts, build_scorers

    train, held_out = build_prompts(cfg.task)
    scorers = build_scorers(cfg.rewards)
    if any(s.dense for s, _ in scorers):
        raise ValueError("seqpg bench: dense (per-token) scorers have no TRL counterpart; use sequence scorers")
    return train, held_out, scorers


def weighted_scores(scorers: list, prompts: list, completions: list[str]) -> list[float]:
    """sum_k w_k score_k per completion: the total reward ``score_batch`` gives (sequence scorers)."""
    totals = [0.0] * len(completions)
    for scorer, weight in scorers:
        for i, v in enumerate(scorer(prompts, completions, None)):
            totals[i] += weight * float(v)
    return totals


def held_out_reward(model, tokenizer, cfg, prompts, scorers) -> dict:
    """Greedy held-out evaluation (``seqpg.training.evaluate``, as ``seqpg eval`` runs it): mean reward and s.e."""
    from ...training.evaluate import evaluate_as_configured

    r = evaluate_as_configured(cfg, model, tokenizer, prompts, scorers)
    return {"mean_reward": r.mean_reward, "se_reward": r.se_reward, "seconds": r.seconds}


def now() -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds): every phase is timed on both clocks.

    Where this process uses a GPU, the GPU's queued work is waited for first, so that a phase
    ends when its kernels do, not when they were launched."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def phase_times(marks: dict[str, tuple[float, float]], bounds: dict[str, tuple[str, str]]) -> dict:
    """{"wall": {phase: s}, "cpu": {phase: s}} from named time marks and each phase's (start, end) marks."""
    return {clock: {p: marks[b][i] - marks[a][i] for p, (a, b) in bounds.items()}
            for i, clock in enumerate(("wall", "cpu"))}


class BackwardClock(torch.overrides.TorchFunctionMode):
    """Records ``now()`` at the start and end of every ``Tensor.backward`` call made while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[tuple[float, float], tuple[float, float]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.Tensor.backward:
            return func(*args, **(kwargs or {}))
        t0 = now()
        out = func(*args, **(kwargs or {}))
        self.spans.append((t0, now()))
        return out


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) since it started or since ``reset_peak_rss``."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def reset_peak_rss() -> None:
    """Restart the VmHWM count from the current resident size (Linux >= 4.0), and the GPU's peak."""
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mib() -> float | None:
    """The peak GPU memory torch's allocator held for tensors since ``reset_peak_rss`` (None without a GPU)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
