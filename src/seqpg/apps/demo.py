"""`make demo`: evaluate the model on held-out prompts, fine-tune it with RL, evaluate again.

The before and after evaluations use the same held-out prompts (never trained on) and greedy
decoding, so the difference is the training's doing; the table gives standard errors over
prompts so a reader can see whether the change is far outside the noise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..training.build import build_prompts, build_scorers
from ..config import load_config
from ..training.evaluate import EvalResult, evaluate_as_configured
from ..rundir.plots import plot_before_after, plot_run
from .session import load_policy_for
from ..training.trainer import train

DEFAULT_CONFIG = "examples/demo.yaml"


def _row(name: str, before: float | None, se_b: float | None, after: float | None, se_a: float | None,
         pct: bool = False) -> str:
    if before is None or after is None:
        return ""
    f = (lambda v: f"{100 * v:6.1f}%") if pct else (lambda v: f"{v:+7.3f}")
    e = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    return f"| {name:<14} | {f(before)} ± {e(se_b):>6} | {f(after)} ± {e(se_a):>6} | " \
           f"{f(after - before)} |"


def summary_table(before: EvalResult, after: EvalResult, n_train_steps: int, seconds: dict[str, float]) -> str:
    lines = ["| held-out metric | before (± s.e.) | after (± s.e.) | change |",
             "|----------------|-------------------|-------------------|---------|",
             _row("mean reward", before.mean_reward, before.se_reward, after.mean_reward, after.se_reward),
             _row("accuracy", before.accuracy, before.se_accuracy, after.accuracy, after.se_accuracy, pct=True)]
    for name in before.per_scorer:
        lines.append(f"| {name:<14} | {before.per_scorer[name]:+7.3f}           | "
                     f"{after.per_scorer[name]:+7.3f}           |         |")
    lines.append(f"| mean length    | {before.mean_length:7.1f}           | {after.mean_length:7.1f}           |"
                 "         |")
    lines = [ln for ln in lines if ln]
    lines.append("")
    lines.append(f"{before.n_prompts} held-out prompts (greedy), {n_train_steps} training steps; wall time: "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return "\n".join(lines)


def run_demo(config: str | None = None, overrides: list[str] | None = None) -> int:
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if Path(cfg.run_dir).exists() and any(Path(cfg.run_dir).iterdir()):
        cfg.run_dir = f"{cfg.run_dir}-{time.strftime('%Y%m%d-%H%M%S')}"  # never mix two demo runs
    t0 = time.monotonic()
    scorers = build_scorers(cfg.rewards)
    _, held_out = build_prompts(cfg.task)
    print(f"seqpg demo: {cfg.model.name}, task {cfg.task.name}, algorithm {cfg.algo.name}, "
          f"{len(held_out)} held-out prompts", flush=True)
    model, tok, _ = load_policy_for(cfg.model.name, cfg)
    seconds = {"load": time.monotonic() - t0}
    t = time.monotonic()
    before = evaluate_as_configured(cfg, model, tok, held_out, scorers)
    seconds["eval before"] = time.monotonic() - t
    print(f"before: mean reward {before.mean_reward:+.3f} ± {before.se_reward:.3f}"
          + (f", accuracy {100 * before.accuracy:.1f}%" if before.accuracy is not None else ""), flush=True)
    del model
    t = time.monotonic()
    result = train(cfg)
    seconds["train"] = time.monotonic() - t
    t = time.monotonic()
    model, tok, step = load_policy_for(str(result.run_dir), load_config(Path(result.run_dir) / "config.yaml"))
    after = evaluate_as_configured(cfg, model, tok, held_out, scorers)
    seconds["eval after"] = time.monotonic() - t
    seconds["total"] = time.monotonic() - t0
    table = summary_table(before, after, step, seconds)
    run = Path(result.run_dir)
    (run / "demo.md").write_text(table + "\n")
    (run / "demo.json").write_text(json.dumps({"before": before.as_dict(with_completions=True),
                                               "after": after.as_dict(with_completions=True),
                                               "steps": step, "seconds": seconds}, indent=2))
    plots = plot_run(run) + [plot_before_after(before.as_dict(), after.as_dict(), run / "plots" / "before_after.png")]
    print("\n" + table + "\n")
    print(f"run: {run}  (metrics.jsonl, samples.jsonl, demo.md, demo.json, TensorBoard events)")
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0
