"""The update's gradient accumulation, held-out evaluation, pass@k and `seqpg explain`."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from seqpg import core
from seqpg.batch import Prompt
from seqpg.apps.cli import main
from seqpg.config import load_config
from seqpg.training.collapse import distinct_n
from seqpg.training.evaluate import evaluate, pass_at_k
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.rollout.interface import Completions
from seqpg.rollout.sampling import SampleSettings
from seqpg.rewards.scorers import make_scorer
from seqpg.training.trainer import train
from seqpg.training.update import UpdateSettings, update
from update_batches import tiny_update_batch


_batch = tiny_update_batch


@pytest.mark.parametrize("agg", core.AGG_MODES)
@pytest.mark.parametrize("loss", ["pg", "ppo", "gspo"])
def test_gradient_accumulation_does_not_change_the_update(agg, loss):
    tok = build_tiny_tokenizer()
    base = build_tiny_model(len(tok), seed=3)
    batch = _batch(base, tok)
    params = []
    for micro in (0, 1, 5):
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        update(model, opt, batch, UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss=loss, agg=agg, micro_batch_size=micro, max_grad_norm=0))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (params[0] - torch.cat([p.flatten() for p in base.parameters()])).abs().max()
    assert moved > 1e-4
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(params[2], params[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clipping_equals_torch_clip_grad_norm(max_norm):
    """Below the threshold seqpg skips the scaling pass torch makes with a factor of exactly 1."""
    from seqpg.training.update import _clip_grad_norm

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(model, tok)
    grads = []
    for clip in (_clip_grad_norm, torch.nn.utils.clip_grad_norm_):
        model.zero_grad(set_to_none=True)
        from seqpg.model.policy import completion_logprobs
        completion_logprobs(model, batch.rollout).logprobs_BC.sum().backward()
        norm = float(clip(list(model.parameters()), max_norm))
        grads.append((norm, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    assert (grads[0][0] > max_norm) == (max_norm == 1e-3)


def test_a_non_finite_gradient_skips_the_optimizer_step():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(model, tok)
    model.lm_head.weight.register_hook(lambda g: g * float("nan"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = update(model, opt, batch, UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg="token-mean"))
    assert stats["skipped_steps"] == 1.0 and stats["grad_norm"] != stats["grad_norm"]  # nan
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # the moments were not touched either
    handle_free = build_tiny_model(len(tok), seed=3).train()
    assert update(handle_free, torch.optim.SGD(handle_free.parameters(), lr=0.1), batch,
                  UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg="token-mean"))["skipped_steps"] == 0.0


def test_pass_at_k_matches_its_definition():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError, match="at least 4"):
        pass_at_k(2, 1, 4)


def test_evaluate_reports_reward_accuracy_standard_errors_and_pass_at_k():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    prompts = [Prompt(w, w, {"answer": "x"}) for w in ("cat", "dog", "sun", "sea", "sky")]
    scorers = [(make_scorer("contains", name="has_x", column="answer"), 1.0)]
    rollouts = Completions(SampleSettings(max_new_tokens=8, chat_template=False))
    res = evaluate(model, tok, prompts, scorers, rollouts=rollouts, ks=(1, 2), samples=4)
    assert res.n_prompts == 5 and res.accuracy is not None
    assert res.mean_reward == pytest.approx(res.accuracy)  # contains gives 1 exactly when correct
    assert set(res.pass_at_k) == {1, 2} and res.pass_at_k[2] >= res.pass_at_k[1]
    assert res.se_reward >= 0 and len(res.completions) == 5
    # the sampled reward: each prompt's mean over its 4 samples, then the mean over prompts; with 0/1 rewards
    # that is exactly pass@1 (c/n averaged over prompts)
    rows = res.sampled_completions
    assert len(rows) == 20
    per_prompt = [sum(r["reward"] for r in rows if r["prompt"] == p.text) / 4 for p in prompts]
    assert res.sampled_reward == pytest.approx(sum(per_prompt) / 5)
    assert res.sampled_reward == pytest.approx(res.pass_at_k[1])
    se = statistics.stdev(per_prompt) / math.sqrt(5)
    assert res.se_sampled_reward == pytest.approx(se)
    assert res.sampled_collapse["collapse/distinct_2"] == pytest.approx(distinct_n([r["completion"] for r in rows]))
    assert "sampled_completions" not in res.as_dict()


def test_evaluate_measures_the_model_in_its_own_precision_not_the_runs_sampler():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    prompts = [Prompt(w, w, {"answer": "x"}) for w in ("cat", "dog", "sun")]
    scorers = [(make_scorer("contains", name="has_x", column="answer"), 1.0)]
    exact = Completions(SampleSettings(max_new_tokens=8, chat_template=False))
    int8 = Completions(SampleSettings(max_new_tokens=8, chat_template=False, dtype="int8"))
    a = evaluate(model, tok, prompts, scorers, rollouts=exact, samples=2)
    b = evaluate(model, tok, prompts, scorers, rollouts=int8, samples=2)
    assert a.completions == b.completions and a.sampled_completions == b.sampled_completions
    assert int8.at_model_precision() == exact and int8.sampling.dtype == "int8"  # the run's own is unchanged


def test_evaluate_samples_without_pass_at_k():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    prompts = [Prompt(w, w, {"answer": "x"}) for w in ("cat", "dog")]
    scorers = [(make_scorer("length", name="len"), 1.0)]  # no correctness: the sampled reward still comes
    rollouts = Completions(SampleSettings(max_new_tokens=8, chat_template=False))
    res = evaluate(model, tok, prompts, scorers, rollouts=rollouts, samples=3)
    assert res.pass_at_k == {} and len(res.sampled_completions) == 6 and res.sampled_reward is not None
    with pytest.raises(ValueError, match="pass@k needs a scorer"):
        evaluate(model, tok, prompts, scorers, rollouts=rollouts, ks=(1,), samples=3)


def test_eval_and_explain_commands_on_a_trained_run(tiny_overrides, capsys):
    run = train(load_config(None, tiny_overrides("steps=3")), progress=False).run_dir
    assert main(["eval", str(run), "--json", str(run / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "mean reward" in out and (run / "eval.json").is_file()
    assert main(["explain", str(run), "--prompt", "cat", "--completion", "aab"]) == 0
    out = capsys.readouterr().out
    assert "log pi" in out and "'a'" in out and "U = " in out
    page = (run / "explain.html").read_text()
    assert "<span class=\"tok\"" in page and "raised by the update" in page


def test_explain_signs_follow_the_advantage(tiny_overrides):
    from seqpg.apps.explain import explain
    run = train(load_config(None, tiny_overrides("steps=2")), progress=False).run_dir
    good = explain(str(run), "cat", "aaaa", seed=1)  # all target: best in its group
    assert good.reward == 1.0 and max(good.group_rewards[1:]) < 1.0
    bad = explain(str(run), "cat", "zzzz", reward=-1.0, seed=1)  # a given reward below every sample's
    assert (good.contributions.direction_BT[0, :4] == 1).all()
    assert (bad.contributions.direction_BT[0, :4] == -1).all()
    torch.testing.assert_close(torch.tensor(good.utility),
                               (good.contributions.logprob_BT * good.contributions.advantage_BT).sum())
