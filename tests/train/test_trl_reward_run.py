"""examples/trl_reward.yaml, reward functions written for TRL, trains the tiny model as shipped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def test_trl_reward_example_trains_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names examples/trl_rewards.py relative to the repository
    cfg = load_config(ROOT / "examples" / "trl_reward.yaml", [
        "model.name=tiny", "steps=2", "task.train_size=40", "task.eval_size=4", "eval_prompts=4",
        "sampling.prompts_per_step=2", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=8",
        "tensorboard=false", "threads=1", f"run_dir={tmp_path / 'run'}"])
    rows = read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")
    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]  # eval_every: 10 in the example; also before and after
    weights = {"answer": 1.0, "format": 0.2, "brevity": 0.01}
    for r in steps:
        assert math.isfinite(r["loss"])
        assert r["reward_none/answer"] == 0.0  # every reasoning-gym prompt has an answer column
        assert r["reward_mean"] == pytest.approx(sum(w * r[f"reward/{n}"] for n, w in weights.items()), abs=1e-6)
