"""Where the KL enters, at equal wall-clock: seqpg's KL as a loss term, seqpg's KL in the reward, TRL's defaults.

Each arm trains the task's model for the same wall-clock minutes (from the end of model loading, checked
after each step, as ``max_minutes`` does), in its own process, with the same thread count, then the
trained model is evaluated by ``seqpg eval`` on the task's held-out prompts (never trained on): greedy
mean reward, sampled mean reward (``--eval-samples`` per prompt, the task's sampling settings) with their
standard errors over prompts, and the collapse watch's figures of the sampled completions.

Arms:
  loss    ``seqpg train`` with the configuration as given and ``algo.kl_mode=loss`` (k3 loss term: the default
          for sampled-baseline estimators)
  reward  the same with ``algo.kl_mode=reward`` (k1 penalty's return-to-go added after the estimator)
  trl     TRL's ``GRPOTrainer`` with its own defaults (beta 0: no KL, loss_type, scale_rewards, epsilon, AdamW)
          on the same prompts, chat template, system prompt, rewards, samples per prompt, prompts per step,
          completion budget and learning rate, with a constant learning rate (its linear decay needs a step
          count, which a wall-clock budget does not have) and in float32 like seqpg (TRL's default bf16 would
          make it slower on a CPU without bf16 units)

Usage (one task per call; arms run one after another, each pinned with ``--cpu``):
  python bench/kl_default.py --name demo -c examples/demo.yaml --minutes 10 --threads 1 --out bench/kl_default
  python bench/kl_default.py --name verifier -c examples/grpo.yaml --minutes 10 algo.kl_coef=0.05

Writes OUT/NAME/ARM/ (the run, ``eval.json``), OUT/NAME/base.eval.json and OUT/NAME/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("loss", "reward", "trl")


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _pinned(cmd: list[str], cpu: str | None) -> list[str]:
    return (["taskset", "-c", cpu] if cpu else []) + cmd


def train_seqpg(config: str, overrides: list[str], mode: str, minutes: float, threads: int, run_dir: Path,
                cpu: str | None) -> float:
    """``seqpg train`` for ``minutes``; returns the command's wall seconds."""
    cmd = [sys.executable, "-m", "seqpg", "train", "-c", config, *overrides, f"algo.kl_mode={mode}",
           f"max_minutes={minutes}", "steps=100000", f"threads={threads}", f"run_dir={run_dir}", "eval_every=0",
           "save_every=100000"]
    t0 = time.monotonic()
    subprocess.run(_pinned(cmd, cpu), check=True, env=_env(threads))
    return time.monotonic() - t0


def train_trl(config: str, overrides: list[str], minutes: float, threads: int, out: Path) -> dict:
    """TRL's GRPOTrainer at its defaults on the configuration's task for ``minutes``; the model saved in OUT/model."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from seqpg.apps.bench.common import quiet, task, weighted_scores
    from seqpg.config import load_config
    from seqpg.rollout.sampling import uses_chat_template
    from seqpg.training.build import build_policy

    quiet()
    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    train_prompts, _, scorers = task(cfg)
    policy, tok = build_policy(cfg.model, cfg.seed, torch.device("cpu"))  # as seqpg train loads it
    sp = cfg.sampling

    def as_trl(text: str):
        if not uses_chat_template(tok, sp.chat_template):
            return text
        system = [{"role": "system", "content": sp.system_prompt}] if sp.system_prompt is not None else []
        return system + [{"role": "user", "content": text}]

    rows = [{"prompt": as_trl(p.text), "idx": i} for i, p in enumerate(train_prompts)]
    rewards: list[float] = []

    def seqpg_scorers(prompts, completions, idx, **_kwargs):  # TRL's reward-function signature
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = weighted_scores(scorers, [train_prompts[i] for i in idx], texts)
        rewards.append(sum(scores) / len(scores))
        return scores

    args = GRPOConfig(output_dir=str(out / "trl_tmp"), use_cpu=True, bf16=False, seed=cfg.seed,
                      per_device_train_batch_size=sp.prompts_per_step * sp.samples_per_prompt,
                      num_generations=sp.samples_per_prompt, max_completion_length=sp.max_new_tokens,
                      temperature=sp.temperature, learning_rate=cfg.optim.lr, lr_scheduler_type="constant",
                      max_steps=100000, logging_strategy="no", save_strategy="no", report_to="none",
                      disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
    clock: dict = {}

    class WallClock(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            clock["start"] = time.monotonic()

        def on_step_end(self, _args, state, control, **_k):
            clock["steps"] = state.global_step
            print(f"trl step {state.global_step}: reward {rewards[-1]:+.3f} "
                  f"({time.monotonic() - clock['start']:.0f} s)", flush=True)
            if time.monotonic() - clock["start"] > 60 * minutes:
                control.should_training_stop = True

    trainer = GRPOTrainer(model=policy, reward_funcs=seqpg_scorers, args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                          callbacks=[WallClock()])
    trainer.train()
    seconds = time.monotonic() - clock["start"]
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    summary = {"steps": clock["steps"], "train_seconds": seconds, "reward_per_step": rewards}
    (out / "trl.json").write_text(json.dumps(summary, indent=1))
    return summary


def evaluate(target: str, config: str | None, overrides: list[str], samples: int, threads: int, path: Path,
             cpu: str | None) -> dict:
    cmd = [sys.executable, "-m", "seqpg", "eval", target, "--samples", str(samples), "--json", str(path),
           *(["-c", config] if config else []), *overrides, f"threads={threads}"]
    subprocess.run(_pinned(cmd, cpu), check=True, env=_env(threads))
    return json.loads(path.read_text())


def seqpg_summary(run_dir: Path) -> dict:
    """Steps, training seconds, the KL and the collapse watch's warnings of a seqpg run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "reward_mean" in r]
    warnings = run_dir / "warnings.jsonl"
    last = steps[-min(5, len(steps)):]

    def mean_of(key: str) -> float | None:
        vals = [r[key] for r in last if key in r and r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {"steps": len(steps), "train_seconds": steps[-1]["wall_time"] - steps[0]["wall_time"] if steps else 0.0,
            "kl_last5": mean_of("kl"), "flat_groups_last5": mean_of("collapse/flat_groups"),
            "warnings": [json.loads(w)["warning"] for w in warnings.read_text().splitlines()]
            if warnings.is_file() else []}


def table(name: str, config: str, overrides: list[str], minutes: float, threads: int, base: dict,
          arms: dict) -> str:
    def fmt(m, se):
        return f"{m:+.3f} ± {se:.3f}" if m is not None and se is not None and not math.isnan(se) else "-"

    lines = [f"## {name}: `{config}` {' '.join(overrides)}", "",
             f"{minutes:g} min of training per arm, {threads} thread(s), held-out prompts: {base['n_prompts']}.", "",
             "| arm | steps | greedy reward | sampled reward | distinct-2 (sampled) | shared opening | KL (last 5) | "
             "collapse warning |", "|---|---:|---:|---:|---:|---:|---:|---|"]

    def row(label, e, s):
        c = e.get("sampled_collapse", {})
        kl = s.get("kl_last5")
        warn = "; ".join(w.split(". Usual remedies")[0][:100] for w in s.get("warnings", [])) or "none"
        lines.append(f"| {label} | {s.get('steps', 0)} | {fmt(e['mean_reward'], e['se_reward'])} | "
                     f"{fmt(e.get('sampled_reward'), e.get('se_sampled_reward'))} | "
                     f"{c.get('collapse/distinct_2', float('nan')):.2f} | {c.get('collapse/shared_opening', 0):.2f} | "
                     f"{'-' if kl is None else f'{kl:.3f}'} | {warn if label != 'base' else '-'} |")

    row("base", base, {})
    for arm, (e, s) in arms.items():
        row(arm, e, s)
    ref = arms.get("trl")
    if ref:
        for arm, (e, _) in arms.items():
            if arm == "trl" or e.get("sampled_reward") is None:
                continue
            for key, se_key, what in (("mean_reward", "se_reward", "greedy"),
                                      ("sampled_reward", "se_sampled_reward", "sampled")):
                d = e[key] - ref[0][key]
                se = math.hypot(e[se_key], ref[0][se_key])
                z = f"{d / se:+.1f} s.e." if se > 0 else "no spread"
                lines.append(f"- {arm} − TRL, {what}: {d:+.3f} ± {se:.3f} ({z})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the task's name in OUT")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", default=None, help="pin each arm's process to these CPUs (taskset -c)")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--out", default="bench/kl_default")
    p.add_argument("--redo", action="store_true", help="measure arms already in OUT/NAME/results.json again")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    a.arms = a.arms.split(",")
    if unknown := set(a.arms) - set(ARMS):
        p.error(f"unknown arm(s) {sorted(unknown)}; valid: {', '.join(ARMS)}")
    out = Path(a.out) / a.name
    if a.trl_worker:
        train_trl(a.config, a.overrides, a.minutes, a.threads, out / "trl")
        return 0
    if "trl" in a.arms:
        import importlib.util
        if importlib.util.find_spec("trl") is None:
            p.error('the trl arm needs TRL: pip install -e ".[bench]" (or leave it out: --arms loss,reward)')
    out.mkdir(parents=True, exist_ok=True)
    base_path = out / "base.eval.json"
    from seqpg.config import load_config
    model = load_config(a.config, a.overrides).model.name
    base = json.loads(base_path.read_text()) if base_path.is_file() else \
        evaluate(model, a.config, a.overrides, a.eval_samples, a.threads, base_path, a.cpu)
    results = json.loads((out / "results.json").read_text())["arms"] if (out / "results.json").is_file() else {}
    for arm in a.arms:
        arm_dir = out / arm
        if arm in results and not a.redo:
            print(f"{a.name}/{arm}: measured already (in {out / 'results.json'}; --redo measures it again)")
            continue
        if arm_dir.exists():  # an arm that did not finish, or --redo
            shutil.rmtree(arm_dir)
        if arm == "trl":
            cmd = [sys.executable, __file__, "--trl-worker", "--name", a.name, "-c", a.config, "--minutes",
                   str(a.minutes), "--threads", str(a.threads), "--out", a.out, *a.overrides]
            arm_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(_pinned(cmd, a.cpu), check=True, env=_env(a.threads))
            summary = json.loads((arm_dir / "trl.json").read_text())
            summary = {"steps": summary["steps"], "train_seconds": summary["train_seconds"]}
            e = evaluate(str(arm_dir / "model"), a.config, a.overrides, a.eval_samples, a.threads,
                         arm_dir / "eval.json", a.cpu)
        else:
            train_seqpg(a.config, a.overrides, arm, a.minutes, a.threads, arm_dir, a.cpu)
            summary = seqpg_summary(arm_dir)
            e = evaluate(str(arm_dir), None, [], a.eval_samples, a.threads, arm_dir / "eval.json", a.cpu)
        results[arm] = {"eval": e, "summary": summary}
        (out / "results.json").write_text(json.dumps({"config": a.config, "overrides": a.overrides,
                                                      "minutes": a.minutes, "threads": a.threads,
                                                      "base": base, "arms": results}, indent=1))
        print(f"{a.name}/{arm}: greedy {e['mean_reward']:+.3f} ± {e['se_reward']:.3f}, sampled "
              f"{e['sampled_reward']:+.3f} ± {e['se_sampled_reward']:.3f}, {summary['steps']} steps", flush=True)
    md = table(a.name, a.config, a.overrides, a.minutes, a.threads, base,
               {arm: (r["eval"], r["summary"]) for arm, r in results.items()})
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
