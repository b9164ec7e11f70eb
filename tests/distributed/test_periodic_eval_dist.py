"""Held-out evaluation during a 2-process run (ddp and fsdp2): one eval line per due step, written by rank 0,
the same numbers as one process gets from the same weights; and TRL-style None metrics over both processes."""

from __future__ import annotations

import json
from pathlib import Path

from dist_helpers import torchrun
from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train

HERE = Path(__file__).parent
EVAL = ["steps=2", "eval_every=2", "eval_prompts=4", "sampling.seed_per_prompt=true",
        "rewards=[{kind: trl_reward, params: {fn: 'seqpg_test_rewards:trl_target_fraction_or_none'}}]"]


def test_evaluation_during_a_two_process_run(overrides, dist_tmp):
    jobs = [{"overrides": overrides(*EVAL, f"parallel={mode}", run=f"eval-{mode}")} for mode in ("ddp", "fsdp2")]
    (dist_tmp / "eval-jobs.json").write_text(json.dumps(jobs))
    launch = torchrun(2, str(HERE / "run_configs.py"), str(dist_tmp / "eval-jobs.json"),
                      log_dir=dist_tmp / "logs-eval", timeout=300)
    assert launch.returncode == 0, launch.output[-4000:]
    one = train(load_config(None, overrides(*EVAL, run="eval-one")), progress=False)
    rows = {name: read_jsonl(dist_tmp / f"eval-{name}" / "metrics.jsonl") for name in ("ddp", "fsdp2")}
    rows["one"] = read_jsonl(one.run_dir / "metrics.jsonl")
    for name, r in rows.items():
        assert not list((dist_tmp / f"eval-{name}").glob("error-rank*.json")), name
        evals = [x for x in r if "eval/reward_mean" in x]
        assert [x["step"] for x in evals] == [0, 2], name  # one line per due step: only rank 0 writes
    # before training every process holds the same weights as the single process: the same greedy numbers
    start = {name: next(x for x in r if x["step"] == 0) for name, r in rows.items()}
    for key in ("eval/reward_mean", "eval/reward_se", "eval/response_length"):
        assert start["ddp"][key] == start["fsdp2"][key] == start["one"][key], key
    # step 1 samples the same completions however many processes (seed_per_prompt): the None fraction and the
    # mean over the samples the function applied to are taken over both processes' samples
    first = {name: next(x for x in r if x["step"] == 1 and "reward_mean" in x) for name, r in rows.items()}
    assert 0.0 < first["one"]["reward_none/trl_reward"] < 1.0
    for key in ("reward_none/trl_reward", "reward/trl_reward", "reward_unscored", "reward_mean"):
        assert first["ddp"][key] == first["fsdp2"][key] == first["one"][key], key
