"""Equal wall clock on the secret-code tool task: (a) RL alone, (b) SFT alone, (c) SFT then RL.

    python bench/sft_then_rl.py [--minutes 10] [--config examples/env_secret_code.yaml] [--out bench/sft_rl]
                                [key=value ...]     # overrides for every run, e.g. threads=2

Each arm gets ``--minutes`` of training wall clock (``max_minutes``; model loading not counted):

  (a) ``seqpg train`` from the base model;
  (b) ``seqpg sft`` on the demonstrations for the whole budget (many epochs, stopped by max_minutes);
  (c) ``seqpg sft`` for the config's ``sft.epochs``, then ``seqpg train --init`` for the time left.

The SFT runs use ``--sft-lr`` (the config's ``optim.lr`` is RL's).

The demonstrations are written first from training prompts only (scripts/secret_code_demos.py).  Every
arm, the base model and (c)'s SFT checkpoint are then evaluated by ``seqpg eval`` on the same held-out
prompts (greedy episodes; the reward is 1 for the right code), and ``OUT/results.md`` / ``results.json``
give each success rate with its standard error, and the differences (c) - (a) and (c) - (b) in standard
errors (the goal is more than 3).  Each arm's held-out completions (final turns) are in ``OUT/*.eval.json``.
Run it on an otherwise idle machine: the arms are compared by wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seqpg(*args: str) -> float:
    """Run ``python -m seqpg ARGS``; its wall-clock seconds (a failure stops the benchmark)."""
    t0 = time.monotonic()
    print("+ seqpg " + " ".join(args), file=sys.stderr, flush=True)
    rc = subprocess.run([sys.executable, "-m", "seqpg", *args], cwd=ROOT).returncode
    if rc not in (0, 3):  # 3: stopped by max_minutes with a checkpoint
        raise SystemExit(f"seqpg {args[0]} failed with exit status {rc}")
    return time.monotonic() - t0


def trained_minutes(run: Path) -> float:
    """Training minutes of a run: the sum of its steps' time/step (loading and evaluation not counted)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r.get("time/step", 0.0) for r in rows) / 60


def evaluate(target: str, config: str, out: Path, overrides: list[str]) -> dict:
    """``seqpg eval``'s result (what `seqpg eval TARGET -c CONFIG` prints), its completions kept in OUT."""
    from seqpg.apps.session import eval_target

    print(f"+ seqpg eval {target}", file=sys.stderr, flush=True)
    result = eval_target(target, config=config if not Path(target).is_dir() else None, overrides=overrides).result
    full = result.as_dict(with_completions=True)
    (out / f"{Path(target).name}.eval.json").write_text(json.dumps(full, indent=2))
    return result.as_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--config", default="examples/env_secret_code.yaml")
    p.add_argument("--out", default="bench/sft_rl")
    p.add_argument("--sft-lr", default="1e-4", help="optim.lr of the SFT runs (the config's is RL's)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    out, cfg, ov = ROOT / args.out, args.config, list(args.overrides)
    shutil.rmtree(out / "runs", ignore_errors=True)
    (out / "runs").mkdir(parents=True)
    runs = out / "runs"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "secret_code_demos.py"), "--config", cfg], check=True)

    seqpg("train", "-c", cfg, "--no-progress", "steps=100000", f"max_minutes={args.minutes}",
          f"run_dir={runs / 'a_rl'}", *ov)
    sft_lr = f"optim.lr={args.sft_lr}"
    seqpg("sft", "-c", cfg, "--no-progress", "sft.epochs=100000", f"max_minutes={args.minutes}", sft_lr,
          f"run_dir={runs / 'b_sft'}", *ov)
    seqpg("sft", "-c", cfg, "--no-progress", f"max_minutes={args.minutes}", sft_lr, f"run_dir={runs / 'c_sft'}", *ov)
    left = max(args.minutes - trained_minutes(runs / "c_sft"), 0.1)
    seqpg("train", "-c", cfg, "--init", str(runs / "c_sft"), "--no-progress", "steps=100000", f"max_minutes={left}",
          f"run_dir={runs / 'c_sft_rl'}", *ov)

    arms = {"base model": "smollm2-135m-instruct", "(a) RL alone": str(runs / "a_rl"),
            "(b) SFT alone": str(runs / "b_sft"), "(c) SFT part only": str(runs / "c_sft"),
            "(c) SFT then RL": str(runs / "c_sft_rl")}
    results = {name: evaluate(target, cfg, out, ov) for name, target in arms.items()}
    for name, target in arms.items():
        if Path(target).is_dir():
            results[name]["trained_minutes"] = trained_minutes(Path(target))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# SFT then RL on the secret-code task, {args.minutes:g} minutes per arm", "",
             "| arm | held-out success | s.e. | training minutes |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mean_reward']:.3f} | {r['se_reward']:.3f} | {r.get('trained_minutes', 0):.1f} |")
    c = results["(c) SFT then RL"]
    for other in ("(a) RL alone", "(b) SFT alone"):
        o = results[other]
        se = math.sqrt(c["se_reward"] ** 2 + o["se_reward"] ** 2)
        d = c["mean_reward"] - o["mean_reward"]
        lines.append(f"\n(c) - {other}: {d:+.3f} = {d / se if se else float('inf'):+.1f} standard errors")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
