"""The example environments: their rules by hand, and a couple of episodes each against the tiny model."""

from __future__ import annotations

import pathlib

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.rollout.environments import EpisodeLimits, load_environment, make_environment
from seqpg.model.policy import completion_logprobs
from seqpg.rollout.episodes import episodes_to_rollout
from seqpg.rollout.multiturn import sample_episodes
from seqpg.rollout.tools import ToolStats, load_tools
from scripted import ENV_CALLS

ENVS = pathlib.Path(__file__).resolve().parents[2] / "examples" / "envs"
LIMITS = EpisodeLimits(max_turns=3, max_new_tokens=16, max_tokens=1200)


def env(name, cls, **params):
    spec = f"{ENVS / name}:{cls}"
    return make_environment(load_environment(spec), params, spec=spec)


def test_calculator_tool_and_rules():
    (calc,) = load_tools([f"{ENVS / 'calculator.py'}:calculate"]).values()
    assert calc.fn("(17 + 4) * 3") == "63" and calc.fn("7 / 2") == "3.5"
    with pytest.raises(ValueError, match="unsupported"):
        calc.fn("__import__('os')")
    e = env("calculator.py", "CalculatorEnv")
    question = e.reset(Prompt("", "p"), seed=3)
    assert question.startswith("What is ") and "<answer>" in question
    assert e.step(f"It is <answer>{e.answer}</answer>")[1:3] == (1.0, True)
    e.reset(Prompt("", "p"), seed=3)
    assert e.step("<answer>-1</answer>")[1:3] == (0.0, True)


def test_feedback_env_gives_the_verifiers_feedback_then_another_try():
    e = env("feedback.py", "FeedbackEnv", max_tries=2)
    e.reset(Prompt("", "p"), seed=0)
    obs, reward, done, info = e.step("<answer>not a number</answer>")
    assert not done and reward == 0.0 and "scored your answer" in obs and "1 tries left" in obs
    obs, reward, done, info = e.step(f"<answer>{e.entry['answer']}</answer>")
    assert done and reward == 1.0 and info["try"] == 2
    e.reset(Prompt("", "p"), seed=0)
    e.step("wrong")
    assert e.step("still wrong")[2] is True  # out of tries


def test_simulated_user_rules():
    e = env("simulated_user.py", "SimulatedUserEnv", patience=2)
    first = e.reset(Prompt("", "p"), seed=0)
    assert first[0]["role"] == "system" and first[1]["role"] == "user"
    obs, reward, done, _ = e.step("What do you like?")
    assert not done and reward == 0.1 and obs
    assert e.step(f"Try {e.preference}!")[1:3] == (1.0, True)


@pytest.mark.parametrize("name, cls, tools", [
    ("calculator.py", "CalculatorEnv", ["calculate"]),
    ("feedback.py", "FeedbackEnv", []),
    ("simulated_user.py", "SimulatedUserEnv", []),
])
def test_examples_run_against_the_tiny_model(tiny_model_and_tokenizer, name, cls, tools):
    model, tok = tiny_model_and_tokenizer
    spec = f"{ENVS / name}:{cls}"
    env_cls = load_environment(spec)
    stats = ToolStats()
    eps = sample_episodes(model, tok, [Prompt("", "a"), Prompt("", "b")], lambda: make_environment(env_cls),
                          limits=LIMITS, tools=load_tools([f"{ENVS / name}:{t}" for t in tools]), tool_stats=stats,
                          generator=torch.Generator().manual_seed(0), env_name=spec, **ENV_CALLS)
    assert all(ep.done or ep.truncated for ep in eps) and all(ep.turns for ep in eps)
    batch = episodes_to_rollout(eps, tok.pad_token_id, n=1)
    with torch.no_grad():
        lp_BC = completion_logprobs(model, batch).logprobs_BC
    act = batch.completion_mask_BC
    torch.testing.assert_close(lp_BC[act], batch.sample_logprobs_BC[act], atol=1e-5, rtol=0)
