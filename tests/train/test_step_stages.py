"""One step, decided once: the stages of ``seqpg.training.step`` are what the trainer and ``seqpg explain`` share."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

import seqpg.training.trainer as trainer_mod
from seqpg.algorithms import FAMILIES, NEEDS, Needs, needs_of
from seqpg.config import ConfigError, load_config
from seqpg.apps.explain import RunJudge
from seqpg.training.step import StepSettings
from seqpg.training.trainer import train


def test_explain_reproduces_a_logged_steps_advantages_with_kl_in_the_reward(tiny_overrides, tmp_path, monkeypatch):
    """The advantages explain computes for step 3's batch equal the ones step 3 trained on, bit for bit,
    with an adaptive KL penalty in the reward (the checkpoint's coefficient, not the initial one)."""
    kl = ["algo.kl_coef=0.5", "algo.kl_mode=reward", "algo.kl_target=0.001", "algo.kl_horizon=16", "save_every=1",
          "keep_checkpoints=5", "algo.whiten=true"]
    run = train(load_config(None, tiny_overrides("steps=2", *kl, run="a")), progress=False).run_dir
    other = tmp_path / "b"
    shutil.copytree(run, other)
    seen = []

    def spy(policy, optimizer, batch, settings, **kw):
        seen.append((batch.rollout, batch.advantages_BC.clone()))
        return real(policy, optimizer, batch, settings, **kw)

    real = trainer_mod.update
    monkeypatch.setattr(trainer_mod, "update", spy)
    resumed = load_config(other / "config.yaml", ["steps=3", f"run_dir={other}"])
    train(resumed, resume=True, progress=False)
    (rollout, trained_adv_BC), = seen  # step 3 only
    monkeypatch.undo()

    judge = RunJudge.load(str(run))  # latest checkpoint: step 2, the policy that sampled step 3
    assert judge.step == 2 and judge.reference is not None
    assert judge.kl_coef != pytest.approx(0.5)  # the adaptive controller moved: the checkpoint's value is used
    n = judge.settings.samples_per_prompt
    prompts = rollout.prompts[::n]
    _, judged = judge.judge(rollout, prompts)
    assert torch.equal(judged.advantages_BC, trained_adv_BC)
    assert judged.kl_BC is not None and float(judged.kl_BC.abs().sum()) > 0
    _, without_kl = dataclasses.replace(judge, kl_coef=0.0).judge(rollout, prompts)
    assert not torch.allclose(without_kl.advantages_BC, trained_adv_BC)  # the KL term matters here


def test_settings_are_decided_once_and_immutable(tiny_overrides):
    cfg = load_config(None, tiny_overrides("algo.name=rloo", "algo.gamma=0.9", "bf16=true",
                                           "sampling.top_k=5", "sampling.top_p=0.9"))
    st = StepSettings.from_config(cfg)
    assert st.family.advantage == "rloo" and dict(st.advantage_params) == {"gamma": 0.9}
    assert st.bf16 and st.update.bf16 and st.sample.top_k == 5 and st.sample.top_p == 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.update.max_grad_norm = 0.0  # noqa: the update's arguments cannot be changed mid-run
    with pytest.raises(TypeError):
        st.advantage_params["gamma"] = 1.0  # read-only view
    explicit = StepSettings.from_config(load_config(None, tiny_overrides("algo.advantage_params={gamma: 0.5}",
                                                                         "algo.name=rloo")))
    assert dict(explicit.advantage_params) == {"gamma": 0.5}  # the estimator's own parameters win


def test_config_names_an_estimator_and_a_loss_directly(tiny_overrides):
    st = StepSettings.from_config(load_config(None, tiny_overrides("algo.advantage=reinforce_baseline",
                                                                   "algo.loss=gspo")))
    assert (st.family.advantage, st.update.loss) == ("reinforce_baseline", "gspo")
    with pytest.raises(ConfigError, match="algo.loss='nope' is not valid; choose one of: pg, ppo, gspo"):
        load_config(None, tiny_overrides("algo.loss=nope"))
    with pytest.raises(ConfigError, match="'rloo'.*samples_per_prompt to 2"):
        load_config(None, tiny_overrides("algo.name=reinforce", "algo.advantage=rloo",
                                         "sampling.samples_per_prompt=1"))
    load_config(None, tiny_overrides("algo.name=reinforce", "sampling.samples_per_prompt=1"))  # needs no group


def test_a_run_with_a_chosen_estimator_and_loss_trains(tiny_overrides):
    cfg = load_config(None, tiny_overrides("steps=2", "algo.advantage=reinforce_baseline", "algo.loss=gspo"))
    result = train(cfg, progress=False)
    assert result.steps_done == 2 and "loss" in result.final_metrics


def test_family_needs_come_from_their_estimator():
    assert FAMILIES["ppo"].critic and FAMILIES["a2c"].needs == NEEDS["gae"]
    assert FAMILIES["remax"].greedy_baseline and FAMILIES["grpo"].needs.groups
    assert needs_of("reinforce") == Needs() and not FAMILIES["reinforce"].needs.groups


def test_choices_in_help_come_from_the_registries():
    from seqpg import core
    from seqpg.config import choices
    from seqpg.rewards.tasks import PROMPT_SOURCES

    c = choices()
    assert c["algo.advantage"] == tuple(core.ADVANTAGE_ESTIMATORS) and "reinforce_baseline" in c["algo.advantage"]
    assert c["algo.loss"] == tuple(core.POLICY_LOSSES) and "gspo" in c["algo.loss"]
    assert c["algo.name"] == tuple(FAMILIES) and c["task.source"] == tuple(PROMPT_SOURCES)
    assert c["algo.kl_estimator"] == tuple(core.KL_ESTIMATORS) and c["algo.agg"] == tuple(core.AGG_MODES)
