"""A sampler in another precision than the trainer: the settings, the exact identity of an exact sampler, the
weights reaching the update, and tiny runs that log the mismatch every step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from seqpg.batch import ScoredBatch
from seqpg.config import ConfigError, load_config
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.model.policy import completion_logprobs
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.step import Scored, StepSettings, judge
from seqpg.training.trainer import train
from seqpg.training.update import update
from update_batches import tiny_update_batch

MISMATCH = ("mismatch/kl", "mismatch/ppl_ratio", "mismatch/truncated_frac", "mismatch/max_abs_logp_diff")


@pytest.mark.parametrize("overrides,check,correction", [
    ([], False, "none"),
    (["sampling.dtype=bfloat16"], True, "tis"),
    (["sampling.dtype=int8"], True, "tis"),
    (["sampling.dtype=bfloat16", "bf16=true"], False, "none"),  # the trainer autocasts to bf16 too
    (["sampling.dtype=bfloat16", "algo.sampler_correction=seq_mis"], True, "seq_mis"),
    (["sampling.dtype=bfloat16", "algo.sampler_correction=none"], True, "none"),  # measured, not corrected
    (["algo.sampler_correction=mis"], True, "mis"),  # the float32 sampler's own rounding, corrected
])
def test_settings_resolve_the_sampler_check(overrides, check, correction):
    st = StepSettings.from_config(load_config(None, ["model.name=tiny", *overrides]))
    assert (st.sampler_check, st.sampler_correction) == (check, correction)


@pytest.mark.parametrize("override,message", [
    ("sampling.dtype=bf16", "sampling.dtype='bf16' is not valid; choose one of: bfloat16, int8"),
    ("algo.sampler_correction=is", "algo.sampler_correction='is' is not valid; choose one of: tis, mis, seq_tis"),
    ("algo.sampler_is_cap=1", "algo.sampler_is_cap must be > 1"),
    ("sampling.fast_decode=false", "sampling.dtype=int8 cannot run with sampling.fast_decode=false"),
    ("model.lora_r=4", "sampling.dtype=int8 cannot run with model.lora_r > 0"),
    ("device=cuda", "sampling.dtype=int8 cannot run with device=cuda"),
    ("model.dtype=bfloat16", "sampling.dtype=int8 cannot run with model.dtype=bfloat16"),
])
def test_bad_sampler_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["model.name=tiny", "sampling.dtype=int8", override])


def _params_after_update(batch, st, seed=0):
    model = build_tiny_model(len(build_tiny_tokenizer()), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    update(model, opt, batch, st.update, max_len=batch.mask_BC.shape[1])
    return [p.detach().clone() for p in model.parameters()]


def test_an_exact_sampler_gets_unit_weights_and_the_update_of_today():
    """The sampler's log-probs set to the trainer's own: every weight is exactly 1, the old policy is unchanged,
    and the update is bit for bit the one without the check."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    batch = tiny_update_batch(model, tok)
    r = batch.rollout
    with torch.no_grad():
        exact_BC = completion_logprobs(model, r).logprobs_BC * r.completion_mask_BC
    r = dataclasses.replace(r, sample_logprobs_BC=exact_BC)
    st = StepSettings.from_config(load_config(None, ["model.name=tiny", "algo.sampler_correction=tis",
                                                     "algo.kl_coef=0", "optim.grad_noise=false"]))
    scored = Scored(ScoredBatch(r, torch.randn(r.batch_size, generator=torch.Generator().manual_seed(1)), {}))
    judged = judge(r, scored, st, kl_coef=0.0, policy=model)
    assert torch.equal(judged.sampler.weights_BC, r.completion_mask_BC.float())
    assert torch.equal(judged.sampler.train_logprobs_BC, exact_BC)
    assert judged.sampler.stats.means()["mismatch/max_abs_logp_diff"] == 0.0
    checked = judged.train_batch(r, st)
    today = dataclasses.replace(checked, sampler_weights_BC=None)
    assert all(torch.equal(a, b) for a, b in zip(_params_after_update(checked, st), _params_after_update(today, st)))


def test_the_correction_weights_reach_the_update():
    tok = build_tiny_tokenizer()
    batch = tiny_update_batch(build_tiny_model(len(tok), seed=0), tok)
    st = StepSettings.from_config(load_config(None, ["model.name=tiny", "optim.grad_noise=false"]))
    w_BC = torch.rand(batch.mask_BC.shape, generator=torch.Generator().manual_seed(2)) * 2
    weighted = dataclasses.replace(batch, sampler_weights_BC=w_BC)
    after = zip(_params_after_update(weighted, st), _params_after_update(batch, st))
    assert not all(torch.equal(a, b) for a, b in after)


@pytest.mark.parametrize("extra", [["sampling.dtype=bfloat16"], ["sampling.dtype=int8", "algo.sampler_correction=mis"],
                                   ["sampling.dtype=bfloat16", "algo.name=ppo", "algo.sampler_correction=seq_tis"]],
                         ids=["bf16-tis", "int8-mis", "bf16-ppo-seq_tis"])
def test_a_lower_precision_sampler_trains_and_logs_the_mismatch_every_step(tiny_overrides, extra):
    rows = read_jsonl(train(load_config(None, tiny_overrides("steps=3", *extra)), progress=False).run_dir
                      / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in MISMATCH) and "time/sampler_check" in r
        assert r["mismatch/max_abs_logp_diff"] > 1e-4 and r["mismatch/kl"] > 0  # another precision, measured
        assert 0 <= r["mismatch/truncated_frac"] <= 1 and r["mismatch/ppl_ratio"] > 0
        assert math.isfinite(r["loss"])


def test_a_run_whose_sampler_is_the_trainer_logs_no_mismatch(tiny_overrides):
    rows = read_jsonl(train(load_config(None, tiny_overrides("steps=1")), progress=False).run_dir / "metrics.jsonl")
    assert not any(k in rows[0] for k in MISMATCH) and "time/sampler_check" not in rows[0]


def test_int8_sampling_on_a_gpu_found_by_device_auto_is_refused_before_the_model_loads(tiny_overrides, monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from seqpg.training import build

    monkeypatch.setattr(build, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    dist = SimpleNamespace(world_size=1, rank=0, device=torch.device("cuda"), enabled=False,
                           fail_together=lambda _what: nullcontext())
    with pytest.raises(ConfigError, match="sampling.dtype=int8 runs on the CPU only.*device=auto found a GPU"):
        build.build_components(load_config(None, tiny_overrides("sampling.dtype=int8")), dist)
