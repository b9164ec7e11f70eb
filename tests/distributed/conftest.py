"""Fixtures for multi-process runs on CPU (gloo): a prompt file and tiny-model overrides."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "train")]
from dist_helpers import WORDS  # noqa: E402


@pytest.fixture(scope="module")
def dist_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def overrides(dist_tmp):
    """key=value overrides (no KL: the tests that are about it set algo.kl_coef) for a fast tiny-model run that
    rewards emitting `a` (as in tests/train)."""
    prompts = dist_tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in WORDS))

    def make(*extra: str, run: str) -> list[str]:
        return ["model.name=tiny", "task.source=jsonl", f"task.name={prompts}", "task.eval_size=4",
                "task.train_size=24", "sampling.chat_template=false", "sampling.max_new_tokens=6",
                "sampling.prompts_per_step=4", "sampling.samples_per_prompt=4",
                "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:target_fraction'}}]",
                "optim.lr=3e-2", "algo.kl_coef=0", "tensorboard=false", "save_every=1000", f"run_dir={dist_tmp / run}", "threads=1",
                "dist_timeout_s=60", *extra]
    return make
