"""`seqpg lab` on the tiny model: estimators planned (and refused by name) before any model loads,
the report written, and REINFORCE's variance as the unit."""

from __future__ import annotations

import json

import pytest

from seqpg.config import ConfigError, load_config
from seqpg.apps.lab import LabSettings, plan_estimators, run_lab


def test_plan_skips_or_refuses_what_the_task_cannot_use():
    names, skipped = plan_estimators(None, 4)
    assert names[0] == "reinforce" and "rloo" in names and "remax" in names
    assert "gae" in skipped and "critic" in skipped["gae"]
    names1, skipped1 = plan_estimators(None, 1)  # groups of one: group baselines have nothing to compare
    assert {"rloo", "grpo", "dr_grpo"} <= set(skipped1) and "reinforce" in names1
    with pytest.raises(ConfigError, match="rloo"):
        plan_estimators(["rloo"], 1)
    with pytest.raises(ConfigError, match="gae.*critic"):
        plan_estimators(["gae"], 8)
    with pytest.raises(ConfigError, match="unknown.*nope"):
        plan_estimators(["nope"], 8)


def test_cli_refuses_before_loading(capsys):
    from seqpg.apps.cli import main
    assert main(["lab", "model.name=/does/not/exist", "--estimators", "gae"]) == 2
    assert "gae" in capsys.readouterr().err


def test_lab_writes_its_report(tiny_overrides, tmp_path):
    reward = "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:vowel_count'}}]"  # varies between samples
    cfg = load_config(None, tiny_overrides(reward))
    out = tmp_path / "lab"
    res = run_lab(cfg, LabSettings(groups=12, reference_groups=8, directions=16, out_dir=str(out),
                                   estimators=["rloo", "dr_grpo", "grpo"]), log=lambda m: None)
    assert res.estimators == ["reinforce", "rloo", "dr_grpo", "grpo"]
    data = json.loads((out / "lab.json").read_text())
    assert data["estimators"]["reinforce"]["variance_ratio"] == [1.0, 0.0]
    # dr_grpo is RLOO times (1 - 1/n) on every sample (sequence rewards): its figures follow exactly
    rloo, dr = data["estimators"]["rloo"], data["estimators"]["dr_grpo"]
    assert dr["bias_factor"][0] == pytest.approx(0.75 * rloo["bias_factor"][0])
    assert dr["variance_ratio"][0] == pytest.approx(0.75 ** 2 * rloo["variance_ratio"][0])
    assert "| rloo |" in (out / "lab.md").read_text() and "Recommendation" in (out / "lab.md").read_text()
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["bias_factor.png", "samples.png",
                                                                  "variance_ratio.png"]


def test_head_inputs_give_the_policy_logprobs_and_keep_fast_decoding():
    import torch

    from seqpg.batch import Prompt
    from seqpg.rollout.fastdecode import supports
    from seqpg.apps.lab import head_inputs
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
    from seqpg.model.policy import completion_logprobs
    from seqpg.rollout.sampling import generate
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=2, seed=0)
    r = generate(model, tok, [Prompt("ab", "0"), Prompt("c", "1")], n=3, max_new_tokens=5, chat_template=False)
    h_BCH = head_inputs(model, r)
    lp = (h_BCH @ model.get_output_embeddings().weight.T).log_softmax(-1)
    lp = lp.gather(2, r.completion_ids_BC[..., None]).squeeze(2)
    want = completion_logprobs(model, r).logprobs_BC
    torch.testing.assert_close(torch.where(r.completion_mask_BC, lp, 0), want, atol=1e-4, rtol=1e-4)
    assert supports(model)  # no output-capturing hooks left behind
