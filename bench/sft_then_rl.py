"""Equal wall clock on a tool task: (a) RL alone, (b) SFT alone, (c) SFT then RL, (d) TRL's SFT then GRPO.

    python bench/sft_then_rl.py [--minutes 10] [--config examples/env_secret_code.yaml] [--out bench/sft_rl]
                                [--dynamic-sampling] [--trl | --trl-sft-only] [--samples N] [--eval-prompts N]
                                [key=value ...]
                                # key=value: overrides for every seqpg run, e.g. threads=2

Each arm gets ``--minutes`` of training wall clock (``max_minutes``; model loading not counted):

  (a) ``seqpg train`` from the base model;
  (b) ``seqpg sft`` on the demonstrations for the whole budget (many epochs, stopped by max_minutes);
  (c) ``seqpg sft`` for the config's ``sft.epochs``, then ``seqpg train --init`` for the time left;
  (c-dyn), with ``--dynamic-sampling``: RL from (c)'s SFT checkpoint for the same time left, with
      ``sampling.dynamic_sampling=true`` (DAPO's; src/seqpg/training/dynamic.py), beside (c) without it;
  (d), with ``--trl``: TRL's SFTTrainer for ``sft.epochs`` on the same demonstration rows, then TRL's
      GRPOTrainer with the same tools and reward for the time left (bench/trl_arm.py says how);
  (d'), with ``--trl-sft-only``: TRL's SFTTrainer alone for the whole budget.

The SFT runs use ``--sft-lr`` (the config's ``optim.lr`` is RL's).

The demonstrations are written first, from training prompts only, by the script that writes the config's
``sft.data`` (written by ``scripts/task_demos.py`` from the task's ``demonstration(name)``).  Every arm, the base model
and (c)'s SFT checkpoint are then evaluated by ``seqpg eval`` on the same held-out prompts (greedy episodes; the
task's reward, 1 for the right answer), and ``OUT/results.md`` / ``results.json`` give each success rate with
its standard error, and the differences of (c) to every other arm in standard errors (the goal is more than 3).
Each arm's held-out completions (final turns) are in ``OUT/*.eval.json``.  Run it on an otherwise idle machine:
the arms are compared by wall clock.
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


def demos_script(config: str) -> tuple[Path, str]:
    """(the script that writes the config's demonstrations, ``sft.data``): ``scripts/task_demos.py``, from the
    ``demonstration(name)`` of the task's environment file; a SystemExit where the task has none."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from task_demos import task_module

    from seqpg.config import load_config

    cfg = load_config(config, [])
    if cfg.sft.data is None or cfg.episode.env is None:
        raise SystemExit(f"{config}: needs sft.data and episode.env (the demonstrations come from "
                         "scripts/task_demos.py and the environment file's demonstration(name))")
    task_module(cfg.episode.env)
    return ROOT / "scripts" / "task_demos.py", cfg.sft.data


def evaluate(target: str, config: str, out: Path, overrides: list[str], name: str, samples: int,
             n_prompts: int) -> dict:
    """``seqpg eval``'s result (what `seqpg eval TARGET -c CONFIG --samples N` prints), its completions kept in
    OUT/NAME.eval.json."""
    from seqpg.apps.session import eval_target, is_run_dir

    print(f"+ seqpg eval {target}", file=sys.stderr, flush=True)
    result = eval_target(target, config=None if is_run_dir(target) else config, overrides=overrides,
                         samples=samples, n_prompts=n_prompts).result
    (out / f"{name}.eval.json").write_text(json.dumps(result.as_dict(with_completions=True), indent=2))
    return result.as_dict()


def run_arms(args, cfg: str, runs: Path, ov: list[str]) -> dict[str, tuple[str, float | None]]:
    """Train every arm asked for; arm name -> (what ``seqpg eval`` evaluates: a run or model directory or the base
    model's name, its training minutes or None for the base model)."""
    from seqpg.config import load_config

    arms: dict[str, tuple[str, float | None]] = {"base model": (load_config(cfg, ov).model.name, None)}

    def seqpg_arm(name: str, run: str, command: str, *options: str) -> None:
        seqpg(command, "-c", cfg, "--no-progress", *options, f"run_dir={runs / run}", *ov)
        arms[name] = (str(runs / run), trained_minutes(runs / run))

    seqpg_arm("(a) RL alone", "a_rl", "train", "steps=100000", f"max_minutes={args.minutes}")
    sft_lr = f"optim.lr={args.sft_lr}"
    seqpg_arm("(b) SFT alone", "b_sft", "sft", "sft.epochs=100000", f"max_minutes={args.minutes}", sft_lr)
    seqpg_arm("(c) SFT part only", "c_sft", "sft", f"max_minutes={args.minutes}", sft_lr)
    sft_minutes = arms["(c) SFT part only"][1]
    left = max(args.minutes - sft_minutes, 0.1)
    variants = [("(c) SFT then RL", "c_sft_rl", [])]
    if args.dynamic_sampling:
        variants.append(("(c-dyn) SFT then RL, dynamic sampling", "c_sft_rl_dyn", ["sampling.dynamic_sampling=true"]))
    for name, run, extra in variants:
        seqpg_arm(name, run, "train", "--init", str(runs / "c_sft"), "steps=100000", f"max_minutes={left}", *extra)
        arms[name] = (arms[name][0], sft_minutes + arms[name][1])
    if args.trl or args.trl_sft_only:
        d = runs / ("d_trl_sft" if args.trl_sft_only else "d_trl")
        cmd = [sys.executable, str(ROOT / "bench" / "trl_arm.py"), "--config", cfg, "--minutes", str(args.minutes),
               "--out", str(d), "--sft-lr", args.sft_lr, *(["--sft-only"] if args.trl_sft_only else []), *ov]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        timing = json.loads((d / "timing.json").read_text())
        if args.trl_sft_only:
            arms["(d') TRL SFT alone"] = (str(d / "sft"), timing["sft_minutes"])
        else:
            arms["(d) TRL SFT part only"] = (str(d / "sft"), timing["sft_minutes"])
            arms["(d) TRL SFT then GRPO"] = (str(d / "final"), timing["sft_minutes"] + timing["grpo_minutes"])
    return arms


def table(results: dict, title: str) -> list[str]:
    """results.md: every arm's held-out success, then (c) against each other arm in standard errors."""
    lines = [title, "", "| arm | held-out success (greedy) | s.e. | sampled ± s.e. | training minutes |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        sampled = ("" if r.get("sampled_reward") is None
                   else f"{r['sampled_reward']:.3f} ± {r['se_sampled_reward']:.3f}")
        lines.append(f"| {name} | {r['mean_reward']:.3f} | {r['se_reward']:.3f} | {sampled} | "
                     f"{r['trained_minutes'] or 0:.1f} |")
    c = results["(c) SFT then RL"]
    for other, o in results.items():
        if other in ("(c) SFT then RL", "base model", "(c) SFT part only"):
            continue
        se = math.sqrt(c["se_reward"] ** 2 + o["se_reward"] ** 2)
        d = c["mean_reward"] - o["mean_reward"]
        lines.append(f"\n(c) - {other}: {d:+.3f} = {d / se if se else float('inf'):+.1f} standard errors")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--config", default="examples/env_secret_code.yaml", help="the task (a config with an sft section)")
    p.add_argument("--out", default="bench/sft_rl")
    p.add_argument("--sft-lr", default="1e-4", help="optim.lr of the SFT runs (the config's is RL's)")
    p.add_argument("--dynamic-sampling", action="store_true",
                   help="also run (c)'s RL part with sampling.dynamic_sampling=true, from the same SFT checkpoint")
    trl = p.add_mutually_exclusive_group()
    trl.add_argument("--trl", action="store_true", help="arm (d): TRL's SFTTrainer then GRPOTrainer")
    trl.add_argument("--trl-sft-only", action="store_true", help="arm (d'): TRL's SFTTrainer alone")
    p.add_argument("--samples", type=int, default=0,
                   help="also sample N episodes per held-out prompt in every evaluation (seqpg eval --samples N)")
    p.add_argument("--eval-prompts", type=int, default=0,
                   help="evaluate on the first N held-out prompts only (0: all; fewer for a quick check of the script)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    out, cfg, ov = ROOT / args.out, args.config, list(args.overrides)
    script, data = demos_script(cfg)
    shutil.rmtree(out / "runs", ignore_errors=True)
    (out / "runs").mkdir(parents=True)
    subprocess.run([sys.executable, str(script), "--config", cfg, "--out", data], check=True, cwd=ROOT)
    arms = run_arms(args, cfg, out / "runs", ov)
    results = {}
    for name, (target, minutes) in arms.items():
        inside = Path(target).is_relative_to(out / "runs")
        file = "_".join(Path(target).relative_to(out / "runs").parts) if inside else Path(target).name
        results[name] = evaluate(target, cfg, out, ov, file, args.samples, args.eval_prompts)
        results[name]["trained_minutes"] = minutes
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = table(results, f"# SFT then RL on {cfg}, {args.minutes:g} minutes per arm")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
