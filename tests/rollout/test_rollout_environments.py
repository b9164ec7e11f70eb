"""Environment loading, step results and limits: every bad input is one clear error naming it."""

from __future__ import annotations

import pytest

from seqpg.rollout.env_adapters import EnvCallError, coerce_step
from seqpg.rollout.environments import (EpisodeLimits, StepResult, as_messages, load_environment,
                                        make_environment)

GOOD = '''
class Echo:
    def __init__(self, turns=2):
        self.turns = turns
    def reset(self, prompt, seed):
        return prompt.text
    def step(self, model_text):
        return ("again", 0.0, False, {})

class NoStep:
    def reset(self, prompt, seed):
        return ""

not_a_class = 3
'''


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text(GOOD)
    return str(path)


def test_loads_module_and_file_classes(env_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_environment("my_env:Echo").__name__ == "Echo"
    echo = load_environment(f"{env_file}:Echo")
    assert make_environment(echo, {"turns": 3}).turns == 3


@pytest.mark.parametrize("spec_suffix, error, words", [
    (":Missing", AttributeError, "has no attribute 'Missing'"),
    (":NoStep", TypeError, "lacks step()"),
    (":not_a_class", TypeError, "is a int, not a class"),
])
def test_bad_classes_are_named(env_file, spec_suffix, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        load_environment(env_file + spec_suffix)
    assert env_file in str(e.value)


@pytest.mark.parametrize("spec, error, words", [
    ("no_such_module_xyz:Env", ImportError, "cannot import module 'no_such_module_xyz'"),
    ("/nowhere/env.py:Env", FileNotFoundError, "no file '/nowhere/env.py'"),
    ("just_a_name", ValueError, "expected 'module:Class'"),
    ("module:", ValueError, "expected 'module:Class'"),
])
def test_bad_specs_are_named(spec, error, words):
    with pytest.raises(error, match=words):
        load_environment(spec)


def test_constructor_refusing_params_is_named(env_file):
    with pytest.raises(TypeError, match="cannot build it with params {'colour': 1}"):
        make_environment(load_environment(f"{env_file}:Echo"), {"colour": 1}, spec="x")


def test_step_results_are_coerced_or_refused():
    r = coerce_step(("hi", 1, 1, {"k": 2}), "environment E: step()")
    assert r == StepResult("hi", 1.0, True, {"k": 2}) and isinstance(r.reward, float)
    gym = coerce_step(("hi", 0.5, False, True, {}), "w")  # gymnasium's (obs, reward, terminated, truncated, info)
    assert gym == StepResult("hi", 0.5, False, {}, truncated=True)
    with pytest.raises(EnvCallError, match="environment E: step\\(\\) must return"):
        coerce_step(("hi", 1.0), "environment E: step()")
    for bad in ("lots", "1.0", True, float("nan"), float("inf"), None):
        with pytest.raises(EnvCallError, match="reward|non-finite"):
            coerce_step(("hi", bad, False, {}), "E")
    with pytest.raises(EnvCallError, match="each message needs str 'role' and 'content'"):
        coerce_step(([{"role": "user"}], 0.0, False, {}), "E")


def test_observations_become_messages():
    assert as_messages("x", where="w") == [{"role": "user", "content": "x"}]
    assert as_messages({"role": "tool", "content": "4"}, where="w") == [{"role": "tool", "content": "4"}]
    with pytest.raises(TypeError, match="w must be a str"):
        as_messages(7, where="w")


def test_limits_cut_turns_and_tokens():
    lim = EpisodeLimits(max_turns=2, max_new_tokens=10, max_tokens=50)
    assert lim.turn_budget(30) == 10 and lim.turn_budget(45) == 5 and lim.turn_budget(60) == 0
    assert not lim.truncated(turns=1, context_tokens=49)
    assert lim.truncated(turns=2, context_tokens=10) and lim.truncated(turns=1, context_tokens=50)
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        EpisodeLimits(max_turns=0, max_new_tokens=10, max_tokens=50)
