"""Every shipped example configuration is valid, and its scorers, prompts and environment build (no model load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqpg.training.build import build_prompts, build_scorers
from seqpg.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_is_an_example_per_algorithm_family():
    from seqpg.algorithms import FAMILIES
    names = {p.stem for p in EXAMPLES}
    assert set(FAMILIES) <= names and "demo" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_is_valid_and_builds(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    scorers = build_scorers(cfg.rewards)
    train, held_out = build_prompts(cfg.task)
    assert (scorers or cfg.episode.env) and train and held_out  # an environment may give the only reward
    assert not {p.text for p in train} & {p.text for p in held_out}


def test_there_is_an_example_per_built_in_environment(monkeypatch):
    monkeypatch.chdir(ROOT)
    envs = {load_config(p).episode.env for p in EXAMPLES}
    for name in ("calculator.py:CalculatorEnv", "feedback.py:FeedbackEnv", "simulated_user.py:SimulatedUserEnv"):
        assert f"examples/envs/{name}" in envs
