"""`seqpg bench --learning`: does seqpg learn as well per step as TRL, and how much sooner in wall-clock?

Both libraries train the same starting model for the same number of steps on the demo's default
task (``examples/demo.yaml``: "Write one sentence about <topic>.", VADER sentiment reward, its
learning rate), with the speed benchmark's matched settings (GRPO, 2 prompts x 8 samples, no KL,
one update per batch, fused AdamW, clipping at norm 1, float32, the same thread count), stepping
in turn.  Each reports its training reward per step, and its held-out reward (greedy, as ``seqpg
eval`` computes it, on the task's held-out prompts) before training and every ``eval_every``
steps; evaluation time is not counted as training time.

Reported: the per-step reward curves and a test of their difference (mean over steps, with the
Welch standard error of the per-step spread; |z| < 2 is agreement within noise); held-out reward
against cumulative training seconds; and the training seconds each library needs to first reach
a common target, the best held-out reward both reached (when it is above the starting reward).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict

from .common import BenchSetup
from .compare import machine_info, run_pair
from .report import write_report


def curve_difference(seqpg: list[float], trl: list[float]) -> dict:
    """Mean per-step reward of each, their difference, its Welch standard error and z = difference / s.e."""
    mean_s, mean_t = statistics.mean(seqpg), statistics.mean(trl)
    se = math.sqrt(statistics.variance(seqpg) / len(seqpg) + statistics.variance(trl) / len(trl)) \
        if min(len(seqpg), len(trl)) > 1 else float("nan")
    diff = mean_s - mean_t
    return {"mean_seqpg": mean_s, "mean_trl": mean_t, "difference": diff, "se": se,
            "z": diff / se if se > 0 else float("nan")}


def held_out_track(raw: dict, name: str) -> list[dict]:
    """[{step, train_seconds, mean_reward, se_reward}] from step 0 (before training)."""
    track = [{"step": 0, "train_seconds": 0.0, **raw["initial_eval"][name]}]
    seconds = 0.0
    for k, rec in enumerate(raw["steps"][name], start=1):
        seconds += rec["step"]
        if "eval" in rec:
            track.append({"step": k, "train_seconds": seconds, **rec["eval"]})
    return track


def time_to_target(tracks: dict[str, list[dict]]) -> dict:
    """The best held-out reward every library reached, and the training seconds each needed to first reach it."""
    start = min(t[0]["mean_reward"] for t in tracks.values())
    target = min(max(p["mean_reward"] for p in t) for t in tracks.values())
    out = {"start": start, "target": target, "reached_above_start": target > start}
    for name, track in tracks.items():
        first = next(p for p in track if p["mean_reward"] >= target)
        out[name] = {"step": first["step"], "train_seconds": first["train_seconds"]}
    return out


def run_learning(config: str = "examples/demo.yaml", overrides: list[str] | None = None, out_dir: str = "bench",
                 steps: int = 20, threads: int = 1, eval_every: int = 5, device: str = "cpu") -> int:
    """Train both libraries ``steps`` steps, alternating; write ``learning.json`` and ``learning.md``."""
    s = BenchSetup(config=config, overrides=list(overrides or []), dtype="fp32", threads=threads, steps=steps,
                   warmup=0, eval_every=eval_every, device=device)
    cfg = s.train_config()
    print(f"seqpg bench --learning: {config}, {steps} steps per library, held-out evaluation every {eval_every} "
          f"steps ({cfg.task.eval_size} prompts), {threads} thread(s)", flush=True)
    machine = machine_info(device)
    raw = run_pair(s, log=lambda line: print(line, flush=True))
    tracks = {name: held_out_track(raw, name) for name in ("trl", "seqpg")}
    report = {
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "setup": asdict(s), "lr": cfg.optim.lr, "eval_prompts": cfg.task.eval_size,
        "reward_per_step": {name: [r["reward"] for r in raw["steps"][name]] for name in tracks},
        "step_seconds": {name: [r["step"] for r in raw["steps"][name]] for name in tracks},
        "curves": curve_difference([r["reward"] for r in raw["steps"]["seqpg"]],
                                   [r["reward"] for r in raw["steps"]["trl"]]),
        "held_out": tracks,
        "time_to_target": time_to_target(tracks),
    }
    write_report(out_dir, "learning", report, markdown)
    return 0


def markdown(report: dict) -> str:
    c, ttt, s = report["curves"], report["time_to_target"], report["setup"]
    trl, mine = report["held_out"]["trl"], report["held_out"]["seqpg"]
    per_step = report["reward_per_step"]
    gpu = report.get("machine", {}).get("gpu") if s.get("device") == "cuda" else None
    lines = [f"`{s['config']}`, {s['steps']} steps per library, lr {report['lr']}, fp32, "
             f"{'on ' + gpu + ', ' if gpu else ''}{s['threads']} thread(s); "
             f"held-out reward: {report['eval_prompts']} prompts, greedy. Median step: TRL "
             f"{statistics.median(report['step_seconds']['trl']):.2f} s, seqpg "
             f"{statistics.median(report['step_seconds']['seqpg']):.2f} s.", "",
             "| step | TRL: training s | TRL: held-out reward | seqpg: training s | seqpg: held-out reward |",
             "|---:|---:|---:|---:|---:|"]
    for a, b in zip(trl, mine):
        lines.append(f"| {a['step']} | {a['train_seconds']:.0f} | {a['mean_reward']:.3f} ± {a['se_reward']:.3f} | "
                     f"{b['train_seconds']:.0f} | {b['mean_reward']:.3f} ± {b['se_reward']:.3f} |")
    lines += ["", "Training reward per step (mean of the step's samples):", "",
              "| | " + " | ".join(str(k + 1) for k in range(len(per_step["trl"]))) + " |",
              "|---|" + "---:|" * len(per_step["trl"]),
              "| TRL | " + " | ".join(f"{v:.2f}" for v in per_step["trl"]) + " |",
              "| seqpg | " + " | ".join(f"{v:.2f}" for v in per_step["seqpg"]) + " |", "",
              f"Mean over the steps: TRL {c['mean_trl']:.3f}, seqpg {c['mean_seqpg']:.3f}; seqpg - TRL = "
              f"{c['difference']:+.3f} ± {c['se']:.3f} (z = {c['z']:.2f}; |z| < 2: the curves agree within noise)."]
    if ttt["reached_above_start"]:
        lines.append(f"Held-out reward {ttt['start']:.3f} at the start; the best both reached, {ttt['target']:.3f}, "
                     f"took TRL {ttt['trl']['train_seconds']:.0f} s of training (step {ttt['trl']['step']}) and seqpg "
                     f"{ttt['seqpg']['train_seconds']:.0f} s (step {ttt['seqpg']['step']}).")
    else:
        lines.append(f"Neither library's held-out reward rose above the starting {ttt['start']:.3f} in "
                     f"{s['steps']} steps, so there is no common target to time.")
    return "\n".join(lines) + "\n"
