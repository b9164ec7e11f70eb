"""Dynamic sampling and overlong filtering (DAPO, Yu et al. 2025): flat groups never reach the update
while groups with spread are at hand, the batch is full when possible, the cap stops the draws, a
resumed run continues exactly, and a truncated completion contributes no gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from seqpg import core
from seqpg.batch import Prompt, RolloutBatch, ScoredBatch
from seqpg.config import ConfigError, load_config, validate_for_processes
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.training.dynamic import Draw, fill_batch
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.step import Scored
from seqpg.training.trainer import train
from seqpg.training.update import TrainBatch, UpdateSettings, update
from resume_runs import full_and_resumed
from update_batches import tiny_update_batch

N = 3  # samples per prompt


def _draw(names: list[str], rewards: list[list[float]], width: int) -> Draw:
    """A scripted draw: one group of N rows per name, completions `width` tokens wide."""
    B = len(names) * N
    prompts = [Prompt(n, n) for n in names]
    rollout = RolloutBatch(
        prompts=[p for p in prompts for _ in range(N)], completions=[f"{p.id}{i}" for p in prompts for i in range(N)],
        prompt_ids_BP=torch.ones(B, 2, dtype=torch.long), prompt_mask_BP=torch.ones(B, 2, dtype=torch.bool),
        completion_ids_BC=torch.full((B, width), 5), completion_mask_BC=torch.ones(B, width, dtype=torch.bool),
        sample_logprobs_BC=torch.zeros(B, width), group_ids_B=torch.arange(len(names)).repeat_interleave(N),
        finished_B=torch.ones(B, dtype=torch.bool))
    r_B = torch.tensor([r for rs in rewards for r in rs])
    return Draw(prompts, rollout, Scored(ScoredBatch(rollout, r_B, {"s": r_B}, correct_B=r_B > 0, num_scorer_errors=1)))


class Script:
    """draw(round) returns the scripted draws in turn and counts the calls."""

    def __init__(self, draws: list[Draw]):
        self.draws, self.calls = draws, 0

    def __call__(self, round_: int) -> Draw:
        assert round_ == self.calls
        self.calls += 1
        return self.draws[round_]


FLAT, SPREAD = [1.0, 1.0, 1.0], [0.0, 1.0, 0.5]


def test_flat_groups_are_dropped_and_more_are_drawn_until_the_batch_is_full():
    script = Script([_draw(["a", "b", "c"], [FLAT, SPREAD, FLAT], 2),
                     _draw(["d", "e", "f"], [SPREAD, FLAT, SPREAD], 4),
                     _draw(["g", "h", "i"], [SPREAD] * 3, 3)])
    out, m = fill_batch(script, groups=3, max_rounds=4, pad_id=0)
    assert script.calls == 2 and m == {"dynamic/rounds": 2.0, "dynamic/flat_drawn": 0.5, "dynamic/full": 1.0}
    assert [p.id for p in out.prompts] == ["b", "d", "f"]  # in the order drawn; the flat a, c, e never reach it
    assert [p.id for p in out.rollout.prompts] == [x for x in "bdf" for _ in range(N)]
    assert out.rollout.group_ids_B.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.scored.batch.rewards_B.tolist() == SPREAD * 3 and out.scored.batch.scores["s"].tolist() == SPREAD * 3
    assert out.scored.batch.correct_B.tolist() == [r > 0 for r in SPREAD * 3]
    assert out.rollout.completion_ids_BC.shape == (9, 4)  # padded to the widest draw
    assert out.rollout.completion_mask_BC[:3].sum().item() == 3 * 2 and out.scored.batch.num_scorer_errors == 2


def test_surplus_groups_of_the_last_draw_are_discarded():
    out, m = fill_batch(Script([_draw(["a", "b", "c"], [SPREAD] * 3, 2)]), groups=2, max_rounds=3, pad_id=0)
    assert [p.id for p in out.prompts] == ["a", "b"] and m["dynamic/rounds"] == 1.0


def test_the_cap_stops_the_draws_and_dropped_groups_fill_the_batch():
    script = Script([_draw(["a", "b"], [FLAT, FLAT], 2), _draw(["c", "d"], [SPREAD, FLAT], 2),
                     _draw(["e", "f"], [SPREAD, SPREAD], 2)])
    out, m = fill_batch(script, groups=2, max_rounds=2, pad_id=0)
    assert script.calls == 2 and m == {"dynamic/rounds": 2.0, "dynamic/flat_drawn": 0.75, "dynamic/full": 0.0}
    assert [p.id for p in out.prompts] == ["c", "a"]  # the one with spread, then the first dropped


def test_one_round_is_the_plain_step():
    d = _draw(["a", "b"], [FLAT, FLAT], 2)
    out, m = fill_batch(Script([d]), groups=2, max_rounds=1, pad_id=0)
    assert out is d and m == {}


def test_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="dynamic_sampling.*group baseline.*'reinforce'"):
        load_config(None, ["sampling.dynamic_sampling=true", "algo.name=reinforce"])
    with pytest.raises(ConfigError, match="max_sample_rounds must be at least 1"):
        load_config(None, ["sampling.max_sample_rounds=0"])
    cfg = load_config(None, ["sampling.dynamic_sampling=true", "sampling.prompts_per_step=4"])
    with pytest.raises(ConfigError, match="one process only"):
        validate_for_processes(cfg, 2)


def test_a_run_trains_only_on_groups_with_spread_and_resumes_exactly(tiny_overrides):
    extra = ["steps=4", "sampling.dynamic_sampling=true", "sampling.max_sample_rounds=6",
             "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:flat_before_n'}}]"]
    full, resumed = full_and_resumed(tiny_overrides, *extra, stop_at=2)
    metrics = read_jsonl(full.run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "dynamic/rounds" in m]
    assert len(steps) == 4 and any(m["dynamic/rounds"] > 1 for m in steps)
    samples = read_jsonl(full.run_dir / "samples.jsonl")
    for m in steps:
        rows = [r for r in samples if r["step"] == m["step"]]
        assert len(rows) == 16  # 4 prompts x 4 samples: always a full batch
        if m["dynamic/full"] == 1.0:
            assert all(r["prompt"] >= "n" for r in rows), m["step"]
            assert m["collapse/flat_groups"] == 0.0
    keys = ("reward_mean", "loss", "grad_norm", "dynamic/rounds", "dynamic/flat_drawn")
    pick = lambda path: [(r["step"], *(r.get(k) for k in keys)) for r in read_jsonl(path) if "loss" in r]  # noqa: E731
    assert pick(resumed.run_dir / "metrics.jsonl") == pick(full.run_dir / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# overlong filtering


_batch = tiny_update_batch


@pytest.mark.parametrize("agg", core.AGG_MODES)
def test_masked_rows_contribute_no_gradient(agg):
    """Training with rows masked out equals training on the other rows alone, and differs from training on all."""
    tok = build_tiny_tokenizer()
    base = build_tiny_model(len(tok), seed=3)
    batch = _batch(base, tok)
    keep_B = torch.tensor([True, False, True, True, False, True, True, True, False, False, True, True])
    masked = TrainBatch(batch.rollout, batch.advantages_BC, batch.returns_BC, batch.old_logprobs_BC, in_loss_B=keep_B)
    params = {}
    kept_only = batch.select(keep_B.nonzero().squeeze(1))
    for name, b, micro in (("masked", masked, 0), ("masked_micro", masked, 5), ("kept_only", kept_only, 0),
                           ("all", batch, 0)):
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        update(model, opt, b, UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg=agg, micro_batch_size=micro, max_grad_norm=0),
               max_len=batch.mask_BC.shape[1])
        params[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(params["masked"], params["kept_only"], rtol=0, atol=1e-6)
    torch.testing.assert_close(params["masked_micro"], params["kept_only"], rtol=0, atol=1e-6)
    assert (params["all"] - params["masked"]).abs().max() > 1e-4


def test_a_batch_masked_entirely_takes_a_zero_step():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3).train()
    batch = _batch(model, tok)
    none = TrainBatch(batch.rollout, batch.advantages_BC, batch.returns_BC, batch.old_logprobs_BC,
                      in_loss_B=torch.zeros(12, dtype=torch.bool))
    before = [p.detach().clone() for p in model.parameters()]
    stats = update(model, torch.optim.SGD(model.parameters(), lr=0.5), none,
                   UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="ppo", agg="token-mean"))
    assert stats["loss"] == 0.0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_run_masks_exactly_the_truncated_completions(tiny_overrides):
    result = train(load_config(None, tiny_overrides("steps=2", "algo.overlong_filter=true", "log_samples_every=1")),
                   progress=False)
    metrics = [m for m in read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in m]
    assert all(m["overlong_masked"] == m["truncated_frac"] for m in metrics)
    assert any(m["overlong_masked"] > 0 for m in metrics)  # max_new_tokens=6: the tiny model is often cut
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    assert all(r["advantage"] == 0.0 for r in samples if r["length"] == 6)
