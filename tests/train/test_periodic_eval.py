"""Held-out evaluation during training (eval_every): what it logs, that it is `seqpg eval`'s number, and that
training with it is exactly training without it, resumed or not."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from seqpg.config import ConfigError, load_config
from seqpg.training.periodic_eval import due, preserved_rng
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train

TRL_REWARD = "rewards=[{kind: trl_reward, params: {fn: 'seqpg_test_rewards:trl_target_fraction'}}]"
from resume_runs import full_and_resumed
from resume_runs import maths as _maths


def _split(rows):
    """(training rows, evaluation rows) of a metrics.jsonl."""
    evals = [r for r in rows if "eval/reward_mean" in r]
    return [r for r in rows if "eval/reward_mean" not in r], evals


def test_due_before_training_every_n_steps_and_after_the_last():
    assert [s for s in range(0, 8) if due(s, 3, 7)] == [0, 3, 6, 7]
    assert not any(due(s, 0, 7) for s in range(8))


def test_preserved_rng_restores_python_numpy_and_torch_streams():
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(3)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_eval_settings_are_checked(tiny_overrides):
    with pytest.raises(ConfigError, match="eval_prompts=5 must be between 1 and task.eval_size=4"):
        load_config(None, tiny_overrides("eval_every=2", "eval_prompts=5"))
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        load_config(None, tiny_overrides("eval_every=-1"))
    load_config(None, tiny_overrides("eval_prompts=5"))  # unused without eval_every: no complaint


def test_training_with_evaluation_equals_training_without_resumed_or_not(tiny_overrides):
    base = ["steps=6", TRL_REWARD, "algo.kl_coef=0.05"]
    plain = train(load_config(None, tiny_overrides(*base, run="plain")), progress=False)
    with_eval = [*base, "eval_every=3", "eval_prompts=3"]
    full, resumed = full_and_resumed(tiny_overrides, *with_eval, stop_at=3)

    plain_rows = read_jsonl(plain.run_dir / "metrics.jsonl")
    full_rows = read_jsonl(full.run_dir / "metrics.jsonl")
    steps, evals = _split(full_rows)
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["eval/prompts"] == 3 and 0.0 <= r["eval/reward_mean"] <= 1.0 for r in evals)
    # the evaluation's scorer drew from every global random stream, yet training is untouched by it
    assert _maths(steps) == _maths(plain_rows)
    assert _maths(read_jsonl(resumed.run_dir / "metrics.jsonl")) == _maths(full_rows)
    completions = [[(r["step"], r["completion"]) for r in read_jsonl(run.run_dir / "samples.jsonl")]
                   for run in (plain, full, resumed)]
    assert completions[0] == completions[1] == completions[2]


def test_evaluation_is_seqpg_evals_number_outside_the_step_and_in_logs_and_plots(tiny_overrides, monkeypatch):
    import seqpg.training.periodic_eval
    from seqpg.apps.session import eval_target

    real, pause = seqpg.training.periodic_eval.evaluate_as_configured, 3.0

    def slow(*args, **kwargs):  # an evaluation that takes 3 s longer: no training step may show it
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(seqpg.training.periodic_eval, "evaluate_as_configured", slow)
    cfg = load_config(None, tiny_overrides("steps=4", "eval_every=2", "eval_prompts=4", "tensorboard=true"))
    run = train(cfg, progress=False).run_dir
    monkeypatch.undo()
    steps, evals = _split(read_jsonl(run / "metrics.jsonl"))
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert {"eval/reward_mean", "eval/reward_se", "eval/response_length", "eval/scorer/callable",
            "time/eval"} <= set(evals[-1])
    assert "eval/accuracy" not in evals[-1]  # the callable scorer has no notion of correctness
    assert all(r["time/eval"] >= pause for r in evals)
    assert all(r["time/step"] < pause for r in steps)
    # the number logged at the last step is the one `seqpg eval RUN` gives for that step's checkpoint
    report = eval_target(str(run), n_prompts=4)
    assert report.step == 4
    assert report.result.mean_reward == evals[-1]["eval/reward_mean"]
    assert report.result.se_reward == evals[-1]["eval/reward_se"]
    assert (run / "plots" / "eval.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/reward_mean")] == [0, 2, 4]


def test_accuracy_is_logged_where_a_scorer_defines_correctness(tiny_overrides, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"word {i}", "answer": "a"}) + "\n" for i in range(12)))
    cfg = load_config(None, tiny_overrides("steps=1", "eval_every=1", "eval_prompts=2", f"task.name={qa}",
                                           "rewards=[{kind: contains}]"))
    rows = read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")
    _, evals = _split(rows)
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 and "eval/accuracy_se" in r for r in evals)
