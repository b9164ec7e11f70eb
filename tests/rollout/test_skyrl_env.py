"""SkyRL-Gym's environments behind the episode.env line (skipped where skyrl-gym is not installed)."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("skyrl_gym")

from seqpg.batch import Prompt  # noqa: E402
from seqpg.rollout.environments import EpisodeLimits, load_environment, make_environment  # noqa: E402
from seqpg.rollout.multiturn import sample_episodes  # noqa: E402
from seqpg.rollout.sampling import SamplingArgs  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from scripted import ENV_CALLS, ScriptedModel  # noqa: E402

SPEC = "seqpg.rollout.skyrl_env:SkyRLEnv"


@pytest.mark.parametrize("env_id, scripts, rewards", [
    ("gsm8k", ["6 times 7 #### 42"], [1.0]),
    ("gsm8k_multi_turn", ["about 40", "6 times 7 #### 42"], None),
])
def test_skyrl_gym_environment_runs_episodes(tiny_model_and_tokenizer, env_id, scripts, rewards):
    model, tok = tiny_model_and_tokenizer
    cls = load_environment(SPEC)
    (ep,) = sample_episodes(ScriptedModel(model, tok, scripts), tok, [Prompt("What is 6*7?", "p", {"answer": "42"})],
                            lambda: make_environment(cls, {"id": env_id}, spec=SPEC), env_name=SPEC,
                            limits=EpisodeLimits(max_turns=2, max_new_tokens=40, max_tokens=2000),
                            sampling=SamplingArgs(greedy=True), env_timeout_s=ENV_CALLS["env_timeout_s"],
                            on_env_error="raise")
    assert [t.text for t in ep.turns] == scripts and ep.env_error is None
    if rewards is not None:
        assert [t.reward for t in ep.turns] == rewards and ep.done
    else:  # multi-turn: the first answer is asked again (a user message), the second is scored
        assert ep.messages[2]["role"] == "user" and ep.turns[-1].reward > ep.turns[0].reward


def test_unknown_skyrl_id_is_named():
    with pytest.raises(ValueError, match="no skyrl_gym environment 'nope'; registered: aime"):
        make_environment(load_environment(SPEC), {"id": "nope"}, spec=SPEC)
