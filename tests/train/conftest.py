"""Helpers for end-to-end runs on the tiny model: a short prompt file and a config builder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # seqpg_test_rewards, importable by `module:function`


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    words = ["cat", "dog", "sun", "sea", "sky", "red", "big", "tea", "cup", "map", "owl", "fox", "ink", "jam",
             "kit", "log", "mud", "net", "oak", "pen", "rug", "toy", "urn", "van", "web", "yak", "zip", "elm"]
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return path


@pytest.fixture
def tiny_overrides(prompt_file, tmp_path):
    """key=value overrides (no KL: the tests that are about it set algo.kl_coef) for a fast tiny-model run that
    rewards emitting the character `a`."""
    def make(*extra: str, run: str = "run") -> list[str]:
        return ["model.name=tiny", "task.source=jsonl", f"task.name={prompt_file}", "task.eval_size=4",
                "task.train_size=24", "sampling.chat_template=false", "sampling.max_new_tokens=6",
                "sampling.prompts_per_step=4", "sampling.samples_per_prompt=4",
                "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:target_fraction'}}]",
                "optim.lr=3e-2", "algo.kl_coef=0", "tensorboard=false", "save_every=1000", f"run_dir={tmp_path / run}", "threads=1",
                *extra]
    return make
