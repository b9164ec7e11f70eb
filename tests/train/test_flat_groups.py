"""Flat groups do not train on noise: every task reward 0, the default KL, three steps on the tiny model.

With a sampled baseline, a group whose task rewards are all equal gives the task nothing to learn. What is
left must stay at the KL term's own scale (max |A| <= 0.05 at beta = 0.05), and at the start, where the
policy is its reference and every KL estimate is float rounding below the noise floor, nothing at all: the
gradient is exactly 0 and the weights stay bit-identical (Adam turns any non-zero gradient, however small,
into a step of about lr). Each case is a layout or precision in which the sampler, the trainer and the
reference compute the same log-probs by different routes.
"""

from __future__ import annotations

import pytest
import torch

import seqpg.model.policy as policy_mod
from seqpg.config import load_config
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.rundir.checkpoint import full_model_state
from seqpg.rundir.runlog import read_jsonl
from seqpg.training.trainer import train

ZERO = "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:zero'}}]"
DEFAULT_KL = "algo.kl_coef=0.05"  # the config's default (tiny_overrides turns it off)
EPISODE = ["rewards=[]", "episode.env=seqpg_test_envs:EchoEnv", "episode.env_weight=0",
           "episode.max_episode_tokens=300", "sampling.chat_template=true", "sampling.prompts_per_step=2",
           "sampling.samples_per_prompt=3"]
LORA = ["model.lora_r=8", "model.lora_alpha=16", "model.lora_target_modules=[lm_head, q_proj, v_proj]"]

CASES = {
    "defaults": [],
    "kl_in_reward": ["algo.kl_mode=reward"],
    "kl_in_reward_k3": ["algo.kl_mode=reward", "algo.kl_estimator=k3"],
    "bf16": ["bf16=true"],
    "bf16_kl_in_reward": ["bf16=true", "algo.kl_mode=reward"],
    "whitened": ["algo.kl_mode=reward", "algo.whiten=true"],
    "reinforce_pp": ["algo.name=reinforce_pp", "algo.kl_mode=reward"],
    "rloo_micro_batches": ["algo.name=rloo", "algo.kl_mode=reward", "optim.micro_batch_size=3"],
    "lora": LORA,
    "lora_kl_in_reward": [*LORA, "algo.kl_mode=reward"],
    "episodes": EPISODE,
    "episodes_kl_in_reward": [*EPISODE, "algo.kl_mode=reward"],
    "padded_layout": ["algo.kl_mode=reward"],  # the trainer's padded layout (an attention that cannot pack)
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_rewards_leave_the_policy_where_it_is(case, tiny_overrides, monkeypatch):
    if case == "padded_layout":
        monkeypatch.setattr(policy_mod, "_attention_implementation", lambda model: "flex_attention")
    cfg = load_config(None, tiny_overrides(ZERO, DEFAULT_KL, "steps=3", "save_every=3", *CASES[case]))
    result = train(cfg, progress=False)
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["collapse/flat_groups"] == 1.0 and r["reward_mean"] == 0.0
        assert r["adv_task_abs_max"] == 0.0  # the estimator saw only the task reward
        assert r["adv_abs_max"] <= 0.05, (r["step"], r["adv_abs_max"])
        assert r["grad_norm"] == 0.0, (r["step"], r["grad_norm"])  # rounding is below the noise floor
    after = full_model_state(result.run_dir / "checkpoints" / "step-000003", "policy")
    if "lora" in case:
        assert all(float(v.abs().max()) == 0.0 for k, v in after.items() if "lora_B" in k)  # B starts at 0
    else:
        before = build_tiny_model(len(build_tiny_tokenizer()), seed=0).state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)


class FixedReference:
    """A reference whose log-probs are given (judge calls ``.logprobs(rollout, temperature=...)``)."""

    def __init__(self, ref_BC: torch.Tensor) -> None:
        self.ref_BC = ref_BC

    def logprobs(self, rollout, *, temperature: float) -> torch.Tensor:
        return self.ref_BC


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_judge_normalises_the_task_reward_and_adds_the_kl_at_its_own_scale(mode, make_rollout):
    """GRPO's std divides the task's centred rewards only; in reward mode -beta * K_t (the KL's return-to-go) is
    added after, unscaled; in loss mode the advantages are the task's alone."""
    from seqpg import core
    from seqpg.batch import ScoredBatch
    from seqpg.training.step import Scored, StepSettings, judge

    rollout = make_rollout([[5], [5], [6], [6]], [[1, 2, 3], [1, 2], [4, 4, 4], [3]], group_ids=[0, 0, 1, 1])
    mask = rollout.completion_mask_BC
    rollout.sample_logprobs_BC = torch.where(mask, torch.tensor([[-1.0, -2.0, -1.5]] * 4), 0.0)
    ref_BC = torch.where(mask, rollout.sample_logprobs_BC - torch.tensor([[0.2, 1e-5, 0.4]] * 4), 0.0)
    rewards_B = torch.tensor([1.0, 0.0, 0.3, 0.3])  # group 1 is flat
    st = StepSettings.from_config(load_config(None, [f"algo.kl_mode={mode}", "algo.kl_coef=0.1"]))
    j = judge(rollout, Scored(ScoredBatch(rollout, rewards_B, {"r": rewards_B})), st, kl_coef=0.1,
              reference=FixedReference(ref_BC))
    task, _ = core.compute_advantages("grpo", rewards_B, mask, group_ids=rollout.group_ids_B)
    kl_BC = core.kl_estimate(st.kl_estimator, rollout.sample_logprobs_BC, ref_BC)  # k1 (reward) or k3 (loss)
    kl_BC[:, 1] = 0.0  # the 1e-5 is under the noise floor
    torch.testing.assert_close(j.kl_BC, kl_BC)
    assert float(kl_BC[0, 0]) > 0.01
    expected = task + core.kl_advantages(kl_BC, 0.1, mask) if mode == "reward" else task
    torch.testing.assert_close(j.advantages_BC, expected)
    assert float(j.advantages_BC[2:].abs().max()) <= 0.1 * 0.6 + 1e-6  # flat group: beta * KL at most
    assert j.task_adv_abs_max == pytest.approx(float(task.abs().max()))
