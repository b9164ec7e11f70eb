"""Environments as users write them: stateful method tools, TRL's environment_factory class, gymnasium's shapes,
the in-process time limit, and rewards that see the whole episode."""

from __future__ import annotations

import os
import sys
import time

import pytest

from seqpg.batch import Prompt
from seqpg.rewards.scorers import make_scorer, score_batch
from seqpg.rollout.env_adapters import EnvCallError, EpisodeEnv, call_with_timeout, merge_tools, method_tools
from seqpg.rollout.environments import env_kind
from seqpg.rollout.environments import EpisodeLimits, load_environment
from seqpg.rollout.episodes import episodes_to_rollout
from seqpg.rollout.multiturn import sample_episodes
from seqpg.rollout.sampling import SamplingArgs
from seqpg.rollout.tools import load_tools

sys.path.insert(0, os.path.dirname(__file__))
from scripted import ENV_CALLS, ScriptedModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMITS = EpisodeLimits(max_turns=4, max_new_tokens=200, max_tokens=4000)


def call(name, **arguments):
    import json
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


class NotebookEnv:
    """seqpg's own protocol with stateful tools, tool_step and get_reward."""

    def reset(self, prompt, seed):
        self.notes, self.seen = {}, []
        return "Write the answer down, then say done."

    def write(self, key: str, value: str) -> str:
        """Write a note.

        Args:
            key: the note's name
            value: what it says
        """
        self.notes[key] = value
        return f"{len(self.notes)} notes"

    def read(self, key: str) -> str:
        """Read a note.

        Args:
            key: the note's name
        """
        return self.notes[key]  # a missing key raises: the model sees the error

    def tool_step(self, model_text, results):
        self.seen.append([(r.name, r.arguments, r.content, r.error) for r in results])
        return 0.5

    def step(self, model_text):
        return None, float(self.notes.get("answer") == "5"), True, {}

    def get_reward(self):
        return 0.25


def run(model, tok, env_cls, scripts, prompt=Prompt("q", "q"), tools=None, **kw):
    tools = tools if tools is not None else method_tools(env_cls(), spec="t")
    (ep,) = sample_episodes(ScriptedModel(model, tok, scripts), tok, [prompt], env_cls, tools=tools, limits=LIMITS,
                            sampling=SamplingArgs(greedy=True), env_name="t", **kw, **ENV_CALLS)
    return ep


def test_public_methods_are_tools_bound_to_the_episode(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    tools = method_tools(NotebookEnv(), spec="t")
    assert sorted(tools) == ["read", "write"] and all(t.method for t in tools.values())
    assert tools["write"].schema["function"]["parameters"]["required"] == ["key", "value"]
    ep = run(model, tok, NotebookEnv, [call("write", key="answer", value="5") + call("read", key="nope"),
                                       call("read", key="answer"), "done"])
    env = ep.env
    assert isinstance(env, NotebookEnv) and env.notes == {"answer": "5"}  # the episode's own instance changed
    assert env.seen[0] == [("write", {"key": "answer", "value": "5"}, "1 notes", None),
                           ("read", {"key": "nope"}, "error: KeyError: 'nope'", "raised")]
    assert env.seen[1] == [("read", {"key": "answer"}, "5", None)]
    assert [t.reward for t in ep.turns] == [0.5, 0.5, 1.25] and ep.done  # tool_step credit; step + get_reward
    assert ep.messages[-1] == {"role": "assistant", "content": "done"} and [m["role"] for m in ep.messages].count("tool") == 3


def test_each_episode_has_its_own_instance():
    a, b = (EpisodeEnv(NotebookEnv(), name="t", timeout_s=5) for _ in range(2))
    for e in (a, b):
        e.reset(Prompt("q", "q"), 0)
    tool = method_tools(a.user, spec="t")["write"]
    assert a.call_tool(tool, {"key": "k", "value": "v"}, 100).content == "1 notes"
    assert a.user.notes == {"k": "v"} and b.user.notes == {}


def test_tool_names_must_not_clash_and_methods_need_a_schema():
    free = load_tools(["tool_fixtures:add"])

    class Clash(NotebookEnv):
        def add(self, a: int, b: int) -> int:
            """Add.

            Args:
                a: x
                b: y
            """
            return a + b

    with pytest.raises(ValueError, match=r"\['add'\] is both a tool function and a method"):
        merge_tools(free, method_tools(Clash(), spec="t"))

    class NoSchema(NotebookEnv):
        def helper(self, x):
            return x

    with pytest.raises(ValueError, match="public method 'helper' is a tool .* or make it private"):
        method_tools(NoSchema(), spec="t")


EXAMPLE_INCREMENT = load_environment(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "envs",
                                                   "increment.py") + ":IncrementEnv")


class IncrementEnv(EXAMPLE_INCREMENT):
    """The example's class (TRL's GRPO guide, unchanged), also keeping the row ``reset`` got for the test."""

    def reset(self, target, **kwargs) -> None:
        self.row = kwargs
        return super().reset(target, **kwargs)


def test_trl_environment_factory_class_runs_unchanged(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert env_kind(IncrementEnv) == "trl"
    prompt = Prompt("Increment the counter to 3.", "p", meta={"target": 3})
    ep = run(model, tok, IncrementEnv, [call("increment", step=2), call("increment", step=1), "Done."], prompt=prompt)
    assert ep.env.counter == 3 and ep.env.row == {"prompt": prompt.text}  # reset(**row): the task's columns
    assert ep.messages[0]["content"] == prompt.text if ep.messages[0]["role"] == "user" else ep.messages[1]
    assert [t.reward for t in ep.turns] == [0.0, 0.0, 1.0] and ep.done  # no tool call ends it; get_reward then
    rollout = episodes_to_rollout([ep], tok.pad_token_id, n=1)
    trl = make_scorer("trl_reward", name="counter", fn=lambda environments, **kw: [e.counter for e in environments])
    whole = make_scorer("callable", name="whole", fn=lambda p, c, meta, episode: len(episode.turns))
    text_only = make_scorer("callable", name="text", fn=lambda p, c, meta: 0.0)
    scored = score_batch(rollout, [(trl, 1.0), (whole, 1.0), (text_only, 1.0)])
    assert scored.scores["counter"].tolist() == [3.0] and scored.scores["whole"].tolist() == [3.0]


def test_trl_reset_string_is_appended_to_the_prompt(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer

    class Greeting(IncrementEnv):
        def reset(self, **kwargs):
            super().reset(target=1)
            return " (counter starts at 0)"

    ep = run(model, tok, Greeting, ["Done."], prompt=Prompt("Reach 1.", "p"))
    assert any(m["content"] == "Reach 1. (counter starts at 0)" for m in ep.messages)


class GymEnv:
    """gymnasium's shapes: reset(*, seed, options) -> (obs, info); step -> 5-tuple, truncated at turn 2."""

    def reset(self, *, seed=None, options=None):
        self.seed_, self.options, self.k = seed, options, 0
        return "go", {"info": 1}

    def step(self, action):
        self.k += 1
        return "again", 1.0, False, self.k >= 2, {}


def test_gymnasium_reset_and_five_tuple_are_accepted(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert env_kind(GymEnv) == "gymnasium"
    ep = run(model, tok, GymEnv, ["a", "b", "c"], prompt=Prompt("task", "p", meta={"level": 2}), tools={})
    assert ep.env.options == {"prompt": "task", "level": 2} and isinstance(ep.env.seed_, int)
    assert ep.truncated and not ep.done and [t.reward for t in ep.turns] == [1.0, 1.0] and ep.env_error is None


def test_loader_accepts_the_three_conventions(tmp_path):
    for cls in ("NotebookEnv", "IncrementEnv", "GymEnv"):
        assert load_environment(f"{__file__}:{cls}").__name__ == cls


def test_in_process_calls_have_a_time_limit():
    t0 = time.monotonic()
    with pytest.raises(EnvCallError, match="ran past its time limit of 0.2 s"):
        call_with_timeout(time.sleep, 3, timeout_s=0.2, what="environment t: step()")
    assert time.monotonic() - t0 < 2
    with pytest.raises(KeyError):
        call_with_timeout({}.__getitem__, "x", timeout_s=1, what="w")


def test_gymnasium_base_class_methods_are_not_tools():
    class Base:  # stands in for gymnasium.Env (not installed here): its public helpers are not tools
        def get_wrapper_attr(self, name):
            return getattr(self, name)

    Base.__module__ = "gymnasium.core"

    class Game(Base, GymEnv):
        def move(self, direction: str) -> str:
            """Move.

            Args:
                direction: up or down
            """
            return direction

    assert env_kind(Game) == "gymnasium" and sorted(method_tools(Game(), spec="t")) == ["move"]


def test_whole_episode_rewards_in_a_single_turn_run(make_rollout):
    """``episode`` is None and ``environments`` is not passed: TRL passes it only with environment_factory."""
    rollout = make_rollout([[1, 2]], [[3, 4]])
    seen = {}

    def whole(p, c, meta, episode):
        seen["episode"] = episode
        return 1.0

    def trl(completions, **kw):
        seen["kw"] = sorted(kw)
        return [0.5]

    scored = score_batch(rollout, [(make_scorer("callable", name="w", fn=whole), 1.0),
                                   (make_scorer("trl_reward", name="t", fn=trl), 1.0)])
    assert seen == {"episode": None, "kw": ["completion_ids", "prompts", "trainer_state"]}
    assert scored.rewards_B.tolist() == [1.5]
