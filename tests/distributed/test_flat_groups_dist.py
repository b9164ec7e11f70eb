"""Flat groups with 2 processes (DDP): every task reward 0 and the default KL leave the weights bit-identical for
three steps, as in one process (tests/train/test_flat_groups.py), with the KL as a loss term (the default) and
as a reward penalty after the estimator."""

from __future__ import annotations

import json

import pytest
import torch

from dist_helpers import HERE, torchrun
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.rundir.checkpoint import full_model_state
from seqpg.rundir.runlog import read_jsonl

ZERO = "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:zero'}}]"
CASES = {"loss": [], "reward": ["algo.kl_mode=reward"]}


@pytest.fixture(scope="module")
def flat_runs(overrides, dist_tmp):
    jobs = [{"overrides": overrides(ZERO, "algo.kl_coef=0.05", "steps=3", "save_every=3", *extra,
                                    run=f"flat/{name}")} for name, extra in CASES.items()]
    (dist_tmp / "flat_jobs.json").write_text(json.dumps(jobs))
    launch = torchrun(2, str(HERE / "run_configs.py"), str(dist_tmp / "flat_jobs.json"), log_dir=dist_tmp / "logs-flat")
    assert launch.returncode == 0, launch.output[-4000:]
    errors = sorted(p.read_text() for p in (dist_tmp / "flat").glob("*/error-rank*.json"))
    assert not errors, errors
    return dist_tmp / "flat"


@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_rewards_leave_the_policy_where_it_is_with_two_processes(case, flat_runs):
    rows = read_jsonl(flat_runs / case / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["adv_abs_max"] <= 0.05 and r["grad_norm"] == 0.0 and r["collapse/flat_groups"] == 1.0
               for r in rows), rows
    before = build_tiny_model(len(build_tiny_tokenizer()), seed=0).state_dict()
    after = full_model_state(flat_runs / case / "checkpoints" / "step-000003", "policy")
    assert all(torch.equal(after[k], before[k]) for k in before)
