"""Collapse watch: the metrics on hand-made steps, the warning once after K collapsed steps, and in a run."""

from __future__ import annotations

import json

import pytest
import torch

from seqpg.training.collapse import (CollapseWatch, collapse_metrics, distinct_in_group, distinct_n, flat_group_fraction,
                                     shared_opening)

GROUPS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_flat_group_fraction():
    assert flat_group_fraction(torch.tensor([1.0, 1.0, 0.0, 0.5, 2.0, 2.0]), GROUPS) == pytest.approx(2 / 3)
    assert flat_group_fraction(torch.zeros(6), GROUPS) == 1.0
    with pytest.raises(ValueError, match=r"\(B,\)"):
        flat_group_fraction(torch.zeros(6, 1), GROUPS)


def test_distinct_metrics():
    texts = ["a b c", "a  b c", "x y", "x z", "", ""]
    assert distinct_in_group(texts, GROUPS) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)  # whitespace-normalised
    assert distinct_n(texts, 2) == pytest.approx(4 / 6)  # (a b), (b c) twice; (x y), (x z)
    assert distinct_n(["", ""], 2) == 0.0  # empty answers: no diversity at all
    assert distinct_n(["amazing amazing amazing amazing amazing"], 2) == pytest.approx(1 / 4)
    assert distinct_n(["42", "17"], 2) == 1.0  # one-word answers: character bigrams, not "empty"
    assert distinct_n(["aaaa", "aaa"], 2) == pytest.approx(1 / 5)  # a repeated character is still collapse


# sampled at step 97 of the bare-defaults sentiment run without KL (README), and at its step 10
ONE_ANSWER = ["I'm a wonderful and kind person with a loving heart, I love chocolate", "I'm a wonderful colorful "
              "and happy person with love and kindness for all", "I am so loving and I adore the sea and its waves",
              "I'm a wonderful and wonderful person who loves the sea and every wave", "The sea is a calm and "
              "lovely place where I can rest all day", "I'm a wonderful person full of love, creativity and a happy heart"]
HEALTHY = ["A leaking roof can turn a cozy home into a damp and gloomy place", "The roof leaked all night and "
           "we put buckets under every drip", "Rain found its way through the old roof tiles again",
           "Chocolate melts slowly on the tongue and leaves a sweet warmth behind", "A bar of dark chocolate "
           "is the best reward after a long day", "In the quiet kitchen the smell of chocolate filled every room"]


def test_shared_opening_sees_one_answer_across_prompts():
    share, opening = shared_opening(ONE_ANSWER, GROUPS)
    assert (share, opening) == (pytest.approx(4 / 6), "i'm a wonderful")  # in groups 0, 1 and 2
    assert shared_opening(HEALTHY, GROUPS) == (0.0, "")
    one_prompt = torch.zeros(6, dtype=torch.long)
    assert shared_opening(ONE_ANSWER, one_prompt) == (0.0, "")  # alike within one prompt is not "across prompts"
    answers = ["The answer is 14", "The answer is 7", "The answer is 3", "The answer is 9", "The answer is 1",
               "The answer is 8"]
    assert shared_opening(answers, GROUPS) == (0.0, "")  # a short answer format is not a collapse
    assert CollapseWatch().collapsed(collapse_metrics(torch.arange(6.0), GROUPS, ONE_ANSWER)).startswith(
        "completions of different prompts open alike (67%")
    assert CollapseWatch().collapsed(collapse_metrics(torch.arange(6.0), GROUPS, HEALTHY)) is None
    assert "collapse/shared_opening" not in collapse_metrics(torch.arange(6.0), GROUPS, ONE_ANSWER, openings=False)
    assert CollapseWatch(max_shared_opening=0.7).collapsed(collapse_metrics(torch.arange(6.0), GROUPS,
                                                                            ONE_ANSWER)) is None


def test_watch_warns_once_after_k_consecutive_collapsed_steps():
    watch = CollapseWatch(steps=3, min_distinct=0.2)
    healthy = collapse_metrics(torch.tensor([0.0, 1.0, 0.5, 0.2, 0.1, 0.9]), GROUPS,
                               ["the sun is warm", "cats sleep all day", "tea is hot today", "red maps fold",
                                "owls fly at night", "big fox runs fast"])
    flat = collapse_metrics(torch.zeros(6), GROUPS, [""] * 6)
    seq = [flat, flat, healthy, flat, flat, flat, flat, flat]
    notes = [watch.update(i + 1, m) for i, m in enumerate(seq)]
    assert [i + 1 for i, n in enumerate(notes) if n] == [6]  # the run restarts after the healthy step 3
    assert "every advantage is 0" in notes[5] and "seqpg sft" in notes[5]
    assert "kl_coef" not in notes[5] and "KL penalty" not in notes[5]  # a KL penalty adds no task signal
    repeated = collapse_metrics(torch.tensor([0.0, 1.0] * 3), GROUPS, ["so amazing amazing amazing amazing"] * 6)
    assert "near-identical" in CollapseWatch().collapsed(repeated)
    assert CollapseWatch(steps=0).update(1, flat) is None  # off


def test_a_run_with_no_signal_warns(tiny_overrides, tmp_path, capsys):
    from seqpg.config import load_config
    from seqpg.training.trainer import train
    cfg = load_config(None, tiny_overrides("steps=4", "collapse_steps=3",
                                           "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:constant'}}]"))
    train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["collapse/flat_groups"] == 1.0 for r in lines)
    assert all(r["collapse/shared_opening"] == 0.0 for r in lines)  # 6-token answers: too short to count
    warnings = [json.loads(x) for x in (tmp_path / "run" / "warnings.jsonl").read_text().splitlines()]
    assert [w["step"] for w in warnings] == [3]
    err = capsys.readouterr().err
    assert "no learning signal" in err and "every advantage is 0" in err and "the policy does not move" in err


FLAT = {"collapse/flat_groups": 1.0, "collapse/distinct_2": 0.9, "collapse/distinct_in_group": 1.0}
FLAT_CASES = [  # what the step trained on -> what the warning must say
    ({"adv_task_abs_max": 0.0, "adv_abs_max": 0.0}, "every advantage is 0: no learning signal"),
    ({"adv_task_abs_max": 0.0, "adv_abs_max": 0.004}, "come only from the KL penalty"),
    ({"adv_task_abs_max": 0.0, "adv_abs_max": 0.0, "kl_loss": 1e-3}, "only the KL loss term moves the policy"),
    ({"adv_task_abs_max": 0.7, "adv_abs_max": 0.7}, "come from the critic's value errors"),
]


@pytest.mark.parametrize("case", range(len(FLAT_CASES)))
def test_the_flat_group_message_says_what_the_advantages_are(case):
    """A step whose task rewards are flat is described by what it trained on (and by nothing else), and is never
    told to add a KL penalty."""
    trained, says = FLAT_CASES[case]
    note = CollapseWatch(steps=1).update(7, {**FLAT, **trained})
    assert says in note and "no learning signal at step 7" in note
    assert not any(other in note for _, other in FLAT_CASES if other != says)
    assert "kl_coef" not in note and "a KL penalty to the reference" not in note


def test_the_defaults_keep_a_kl_term_to_the_starting_model():
    """Defaults: KL 0.05 to the starting model, as a loss term (k3, GRPO's) for estimators with a sampled
    baseline, as a reward penalty (k1) for a critic's estimator; 0 turns the reference off."""
    from seqpg.config import load_config
    from seqpg.training.step import StepSettings

    st = StepSettings.from_config(load_config(None, []))
    assert st.uses_reference and st.kl_mode == "loss" and st.kl_estimator == "k3" and not st.kl_in_advantages
    ppo = StepSettings.from_config(load_config(None, ["algo.name=ppo"]))
    assert ppo.kl_mode == "reward" and ppo.kl_estimator == "k1" and not ppo.kl_in_advantages
    grpo_reward = StepSettings.from_config(load_config(None, ["algo.kl_mode=reward"]))
    assert grpo_reward.kl_estimator == "k1" and grpo_reward.kl_in_advantages
    assert StepSettings.from_config(load_config(None, ["algo.kl_mode=loss"])).update.kl_estimator == "k3"
    assert StepSettings.from_config(load_config(None, ["algo.kl_estimator=k2"])).kl_estimator == "k2"
    assert not StepSettings.from_config(load_config(None, ["algo.kl_coef=0"])).uses_reference


def test_k1_as_a_loss_term_is_refused():
    """k1's loss gradient is grad log pi, whose expectation is 0: as a loss term it holds nothing."""
    from seqpg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="k1 as a loss term"):
        load_config(None, ["algo.kl_estimator=k1"])  # kl_mode null: a loss term for grpo
    load_config(None, ["algo.kl_estimator=k1", "algo.kl_mode=reward"])
    load_config(None, ["algo.kl_estimator=k1", "algo.kl_coef=0"])  # no KL at all: nothing to refuse
