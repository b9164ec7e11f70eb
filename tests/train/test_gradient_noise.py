"""The update's gradient-noise metrics: exactly the core's fit of the nested micro-batch gradients
(computed here by hand, one backward per prefix), none with one micro-batch, and no change to the update."""

from __future__ import annotations

import copy

import pytest
import torch

from seqpg import core
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.training.gradnoise import METRICS
from seqpg.training.update import TrainBatch, UpdateSettings, _micro_loss, noise_split, update
from update_batches import tiny_update_batch


_batch = tiny_update_batch


def _prefix_sq(model, batch: TrainBatch, s: UpdateSettings, rows: int) -> float:
    """|mean gradient of the first ``rows`` rows|^2, scaled as the update scales it (shares of the whole batch)."""
    B, C = batch.mask_BC.shape
    model.zero_grad(set_to_none=True)
    sub = batch.select(torch.arange(rows))
    loss, _ = _micro_loss(model, None, sub, s, 0.0, float(batch.mask_BC.sum()), float(B), C)
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return float(norm) ** 2 * (B / rows) ** 2


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("micro", [4, 5])
def test_metrics_are_the_core_fit_of_the_nested_micro_batch_gradients(agg, micro):
    tok = build_tiny_tokenizer()
    base = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(base, tok)
    B = batch.mask_BC.shape[0]
    s = UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg=agg, micro_batch_size=micro, max_grad_norm=0)
    prefixes = list(range(micro, B, micro)) + [B]
    sq = [_prefix_sq(copy.deepcopy(base), batch, s, r) for r in prefixes]
    want = core.gradient_noise_scale(torch.tensor(sq, dtype=torch.float64), torch.tensor(prefixes, dtype=torch.float64))
    model = copy.deepcopy(base)
    got = update(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, s)
    assert got["gns/grad_sq"] == pytest.approx(float(want.grad_sq), rel=1e-4)
    assert got["gns/trace_cov"] == pytest.approx(float(want.trace_cov), rel=1e-4)
    assert got["gns/b_simple"] == pytest.approx(float(want.b_simple), rel=1e-4)
    assert float(want.trace_cov) != pytest.approx(0.0, abs=1e-9)  # the micro-batches' gradients do differ


def test_one_micro_batch_logs_no_noise_scale():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(model, tok)
    for micro in (0, 12, 20):
        stats = update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch,
                       UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="pg", agg="token-mean", micro_batch_size=micro))
        assert not set(METRICS) & set(stats), micro


def test_several_mini_batches_pool_their_observations():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(model, tok)
    stats = update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch,
                   UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="pg", agg="token-mean", minibatches=2, epochs=2, micro_batch_size=3),
                   generator=torch.Generator().manual_seed(0))
    assert set(METRICS) <= set(stats) and all(torch.isfinite(torch.tensor(stats[k])) for k in METRICS)


@pytest.mark.parametrize("ids, cut", [([0, 0, 0, 0, 1, 1, 1, 1], 4), ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3),
                                      ([0, 0, 1, 1, 1, 1, 1, 1], 2), ([5, 5, 5, 5, 5], 2), ([0, 1], 1),
                                      ([0, 0, 1, 2, 3, 3, 3, 3], 4), ([0, 1, 1, 1, 1, 1, 1, 2], 1)])
def test_noise_split_cuts_at_the_group_boundary_nearest_the_middle(ids, cut):
    assert noise_split(torch.tensor(ids)) == cut


def test_noise_split_refuses_fewer_than_two_rows():
    with pytest.raises(ValueError, match="B >= 2"):
        noise_split(torch.tensor([0]))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grad_noise_splits_one_micro_batch_in_two_without_changing_the_update(agg):
    tok = build_tiny_tokenizer()
    base = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(base, tok)
    B = batch.mask_BC.shape[0]
    cut = noise_split(batch.rollout.group_ids_B)
    assert 0 < cut < B and cut % 4 == 0  # whole groups of 4 on each side
    plain = UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg=agg, micro_batch_size=0, max_grad_norm=0)
    split = UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, loss="ppo", agg=agg, micro_batch_size=0, max_grad_norm=0, grad_noise=True)
    sq = [_prefix_sq(copy.deepcopy(base), batch, plain, r) for r in (cut, B)]
    want = core.gradient_noise_scale(torch.tensor(sq, dtype=torch.float64),
                                     torch.tensor([cut, B], dtype=torch.float64))
    models = {name: copy.deepcopy(base) for name in ("plain", "split")}
    stats = {name: update(m, torch.optim.SGD(m.parameters(), lr=0.5), batch, s)
             for (name, m), s in zip(models.items(), (plain, split))}
    assert not set(METRICS) & set(stats["plain"])
    assert stats["split"]["gns/trace_cov"] == pytest.approx(float(want.trace_cov), rel=1e-4)
    assert stats["split"]["gns/grad_sq"] == pytest.approx(float(want.grad_sq), rel=1e-4)
    for a, b in zip(models["plain"].parameters(), models["split"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same step
    moved = sum(float((a - b).abs().sum()) for a, b in zip(base.parameters(), models["split"].parameters()))
    assert moved > 0
    assert stats["split"]["loss"] == pytest.approx(stats["plain"]["loss"], rel=1e-5, abs=1e-7)


def test_grad_noise_leaves_an_explicit_micro_batch_split_alone():
    tok = build_tiny_tokenizer()
    base = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(base, tok)
    got = {}
    for flag in (False, True):
        m = copy.deepcopy(base)
        got[flag] = update(m, torch.optim.SGD(m.parameters(), lr=0.0), batch,
                           UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, loss="pg", agg="token-mean", micro_batch_size=5, grad_noise=flag))
    assert got[True]["gns/b_simple"] == pytest.approx(got[False]["gns/b_simple"], rel=1e-6)


def test_the_config_default_measures_the_noise_scale_and_can_turn_it_off():
    from seqpg.config import load_config
    from seqpg.training.step import StepSettings

    assert StepSettings.from_config(load_config(None, [])).update.grad_noise is True
    off = load_config(None, ["optim.grad_noise=false"])
    assert StepSettings.from_config(off).update.grad_noise is False
