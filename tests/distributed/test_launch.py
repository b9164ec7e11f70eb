"""`torchrun ... -m seqpg train` end to end: 2 processes learn, resume with 1, write one set of logs;
a scorer that raises on one process stops every process promptly, each saying why."""

from __future__ import annotations

import statistics

import pytest

from dist_helpers import torchrun
from seqpg.config import ConfigError, load_config, validate_for_processes
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train


def test_two_processes_learn_then_one_resumes_into_the_same_logs(overrides, dist_tmp):
    launch = torchrun(2, "-m", "seqpg", "train", "--no-progress", *overrides("steps=30", "save_every=10", run="learn"),
                      log_dir=dist_tmp / "logs-learn")
    assert launch.returncode == 0, launch.output[-4000:]
    run = dist_tmp / "learn"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))  # one row per step: only rank 0 writes
    rewards = [r["reward_mean"] for r in rows]
    first, last = rewards[:5], rewards[-5:]
    se = (statistics.pvariance(first) / 5 + statistics.pvariance(last) / 5) ** 0.5
    gain = statistics.mean(last) - statistics.mean(first)
    assert gain > 0.3 and gain > 6 * se, rewards  # the criterion of tests/train/test_learning.py
    assert len(read_jsonl(run / "samples.jsonl")) == 30 * 16  # both processes' samples, once each
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000020", "step-000030"]
    # warnings.jsonl: the collapse watch may fire, rightly: this reward's optimum is "aaaaaa" for every prompt
    assert sorted(p.name for p in run.iterdir() if p.name != "warnings.jsonl") == [
        ".lock", "checkpoints", "config.yaml", "metrics.jsonl", "plots", "samples.jsonl"]
    if (run / "warnings.jsonl").exists():
        assert all("collapse" in w["warning"] or "no learning signal" in w["warning"]  # every group at the optimum
                   for w in read_jsonl(run / "warnings.jsonl"))

    resumed = train(load_config(run / "config.yaml", ["steps=36"]), resume=True, progress=False)
    assert resumed.steps_done == 36
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 37))
    after = [r["reward_mean"] for r in rows[30:]]
    assert statistics.mean(after) > statistics.mean(first) + 0.3, after  # the learned weights were loaded
    assert len(read_jsonl(run / "samples.jsonl")) == 36 * 16
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000036"


def test_a_scorer_that_raises_on_rank_1_stops_every_rank_promptly(overrides, dist_tmp):
    fragile = "rewards=[{kind: callable, name: fragile, params: {fn: 'dist_test_rewards:raises_on_rank_1'}}]"
    launch = torchrun(2, "-m", "seqpg", "train", "--no-progress", *overrides("steps=20", fragile, run="fragile"),
                      log_dir=dist_tmp / "logs-fragile")
    assert launch.returncode != 0
    assert launch.seconds < 60, launch.seconds  # start-up is ~10 s; a hang would reach dist_timeout_s=60
    for rank in (0, 1):
        said = launch.rank_lines(rank)
        assert f"seqpg [rank {rank}]: stopping: rank 1 of 2 failed during sampling and scoring" in said, said[-3000:]
        assert "scorer 'fragile'" in said and "cannot run on rank 1" in said
    assert "ProcessFailed: rank 1 of 2 failed" in launch.rank_lines(0)
    assert "ScorerError" in launch.rank_lines(1)


def test_the_batch_must_split_evenly_over_processes(overrides):
    cfg = load_config(None, overrides("sampling.prompts_per_step=3", run="unused"))
    validate_for_processes(cfg, 1)
    with pytest.raises(ConfigError, match="multiple of 2"):
        validate_for_processes(cfg, 2)
    cfg = load_config(None, overrides("sampling.prompts_per_step=2", "sampling.samples_per_prompt=2",
                                      "algo.minibatches=3", run="unused"))
    with pytest.raises(ConfigError, match="each process's batch of 2 samples"):
        validate_for_processes(cfg, 2)
