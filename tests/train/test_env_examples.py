"""The example environments users copy train on the tiny model from their shipped configs: a stateful-tool
environment (examples/env_cart.yaml) and a class written for TRL's environment_factory
(examples/env_trl_increment.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqpg.config import load_config
from seqpg.rundir.runlog import read_jsonl
from seqpg.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.name=tiny", "steps=2", "sampling.max_new_tokens=24", "sampling.prompts_per_step=2",
        "sampling.samples_per_prompt=2", "episode.max_episode_tokens=500", "episode.max_turns=2", "threads=1",
        "tensorboard=false", "save_every=1000", "task.train_size=8", "task.eval_size=3",
        "sampling.chat_template=false"]  # the tiny model has 512 positions of characters: no room for a template


@pytest.mark.parametrize("example, tools", [("env_cart", ["add_to_cart", "view_cart"]),
                                            ("env_trl_increment", ["increment"])])
def test_example_environment_trains_on_the_tiny_model(example, tools, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / f"{example}.yaml", TINY + [f"run_dir={tmp_path / 'run'}"])
    result = train(cfg, progress=False)
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["episode/env_errors"] == 0 for r in rows)
    assert all("reward/env" in r and r["episode/turns"] >= 1 for r in rows)
    from seqpg.rollout.interface import rollouts_from_config

    rollouts = rollouts_from_config(cfg)
    assert sorted(n for n, t in rollouts.tools.items() if t.method) == tools  # its methods are the model's tools
