"""One bad episode never stops a run (episode.on_env_error): an environment that raises, hangs, returns a bad
reward or shape, a first observation over the budget, a template that rewrites history; every episode failing
stops the run with one line; a bad template is refused before any model loads."""

from __future__ import annotations

import pytest
from faultkit import overrides

from seqpg.apps.cli import report_failure
from seqpg.batch import Prompt
from seqpg.config import ConfigError, EpisodeConfig, load_config
from seqpg.model.loading import build_tiny_tokenizer
from seqpg.rollout.env_errors import EpisodeFailure
from seqpg.rollout.environments import EpisodeLimits
from seqpg.rollout.multiturn import sample_episodes
from seqpg.rundir.runlog import read_jsonl
from seqpg.training.trainer import train

from fault_envs import Flaky

PROMPTS = [Prompt("cat", "p-cat"), Prompt("dog", "p-dog")]
LIMITS = EpisodeLimits(max_turns=3, max_new_tokens=6, max_tokens=400)


@pytest.mark.parametrize("mode, where, why", [
    ("reset_raises", "reset", "RuntimeError: the environment's server is down"),
    ("huge_obs", "reset", "no room under max_tokens=400"),
    ("step_raises", "turn 1", "ValueError: step failed on turn 2"),
    ("hang", "turn 1", "ran past its time limit of 0.3 s"),
    ("nan", "turn 1", "non-finite reward nan"),
    ("bool", "turn 1", "reward True \\(bool\\), not a number"),
    ("str", "turn 1", "reward '1.0' \\(str\\), not a number"),
    ("bad_shape", "turn 1", "must return StepResult"),
])
def test_a_failing_episode_is_closed_and_the_others_go_on(tiny_model_and_tokenizer, mode, where, why, capsys,
                                                          monkeypatch):
    import seqpg.rollout.env_errors as env_errors

    monkeypatch.setattr(env_errors, "_reported", set())
    model, tok = tiny_model_and_tokenizer
    eps = sample_episodes(model, tok, PROMPTS, lambda: Flaky(mode, "cat"), n=2, limits=LIMITS, env_name="Flaky",
                          env_timeout_s=0.3, on_env_error="drop")
    bad, good = eps[:2], eps[2:]
    for ep in good:
        assert ep.env_error is None and ep.done and [t.reward for t in ep.turns] == [0.5, 0.5, 0.5]
    for ep in bad:
        assert ep.truncated and not ep.done and ep.env_error.startswith(where)
        assert pytest.approx(0) == sum(t.reward for t in ep.turns[1:])  # the failing turn is unrewarded
        assert len(ep.turns) == (1 if where == "reset" else 2)
    import re
    assert re.search(why, bad[0].env_error)
    err = capsys.readouterr().err
    assert err.count("seqpg: environment Flaky failed at") == 1 and "prompt 'p-cat'" in err  # printed once


def test_raise_stops_at_the_first_failure_naming_environment_prompt_and_turn(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(EpisodeFailure, match="environment Flaky failed at turn 1 of an episode of prompt 'p-cat': "
                                             "ValueError: step failed on turn 2"):
        sample_episodes(model, tok, PROMPTS, lambda: Flaky("step_raises", "cat"), limits=LIMITS, env_name="Flaky",
                        env_timeout_s=EpisodeConfig().env_timeout_s, on_env_error="raise")


def test_a_template_rejecting_the_message_order_closes_the_episode(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 1 %}"
                         "{{ raise_exception('roles must alternate user/assistant once') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    eps = sample_episodes(model, tok, PROMPTS, lambda: Flaky("step_raises", "none"), limits=LIMITS, env_name="F",
                          env_timeout_s=EpisodeConfig().env_timeout_s, on_env_error="drop")
    assert all(ep.truncated and len(ep.turns) == 1 and "roles must alternate" in ep.env_error for ep in eps)
    assert all(ep.turns[0].reward == 0 for ep in eps)


EPISODE = ["rewards=[]", "episode.env=fault_envs:Flaky", "episode.max_episode_tokens=300", "steps=2", "save_every=1000"]


def test_a_run_with_bad_episodes_trains_and_counts_them(prompt_file, tmp_path):
    cfg = load_config(None, overrides(prompt_file, tmp_path / "run", *EPISODE,
                                      "episode.env_params={mode: step_raises, fail_on: 'cat,sun,sky,big'}"))
    run = train(cfg, progress=False).run_dir
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["episode/env_errors"] for r in rows) > 0 and all(r["episode/env_errors"] < 16 for r in rows)
    failed = [s for s in read_jsonl(run / "samples.jsonl") if s["env_error"]]
    assert failed and all(s["prompt"] in ("cat", "sun", "sky", "big") and "step failed" in s["env_error"]
                          for s in failed)


def test_every_episode_failing_stops_the_run_with_one_line(prompt_file, tmp_path, capsys):
    cfg = load_config(None, overrides(prompt_file, tmp_path / "run", *EPISODE,
                                      "episode.env_params={mode: reset_raises, fail_on: '*'}"))
    with pytest.raises(EpisodeFailure, match="every one of the step's 16 episodes failed") as e:
        train(cfg, progress=False)
    capsys.readouterr()
    assert report_failure(e.value) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_on_env_error_and_env_timeout_are_checked(prompt_file, tmp_path):
    for bad, message in (("episode.on_env_error=ignore", "episode.on_env_error must be one of drop, raise"),
                         ("episode.env_timeout_s=0", "episode.env_timeout_s must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides(prompt_file, tmp_path / "run", *EPISODE, bad))


TRIMMING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_that_rewrites_history_is_refused_before_any_model_loads(prompt_file, tmp_path, monkeypatch):
    import seqpg.training.build as build_mod

    def trimming_tokenizer():
        tok = build_tiny_tokenizer()
        tok.chat_template = TRIMMING
        return tok

    monkeypatch.setattr(build_mod, "build_tiny_tokenizer", trimming_tokenizer)
    monkeypatch.setattr(build_mod, "build_policy", lambda *a, **k: pytest.fail("a model loaded"))
    cfg = load_config(None, overrides(prompt_file, tmp_path / "run", *EPISODE, "sampling.chat_template=true"))
    with pytest.raises(ConfigError, match="sampling.chat_template: .*rewrites text already in the context"):
        train(cfg, progress=False)
