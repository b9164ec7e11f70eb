"""`seqpg demo` end to end on the tiny model, and a short real-model run (marked real_model)."""

from __future__ import annotations

import json
import math

import pytest

from seqpg.apps.demo import run_demo
from seqpg.rundir.runfiles import read_jsonl

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_demo_prints_before_after_table_and_writes_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "demo"
    code = run_demo("examples/demo.yaml", ["model.name=tiny", "steps=2", "task.eval_size=6",
                                           "sampling.max_new_tokens=6", f"run_dir={run}", "tensorboard=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| mean reward" in out and "| accuracy" in out and "6 held-out prompts" in out
    summary = json.loads((run / "demo.json").read_text())
    assert summary["steps"] == 2 and summary["before"]["n_prompts"] == 6
    assert (run / "plots" / "before_after.png").stat().st_size > 1000
    # a second demo never writes into the first one's directory
    assert run_demo("examples/demo.yaml", ["model.name=tiny", "steps=1", "task.eval_size=6",
                                           "sampling.max_new_tokens=4", f"run_dir={run}",
                                           "tensorboard=false"]) == 0
    assert len(list(tmp_path.glob("demo*"))) == 2


@pytest.mark.real_model
def test_real_model_trains_two_steps_of_the_demo_task(tmp_path, monkeypatch):
    from seqpg.config import load_config
    from seqpg.training.trainer import train
    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/demo.yaml", ["steps=2", "sampling.max_new_tokens=12", "task.eval_size=4",
                                             f"run_dir={tmp_path / 'run'}", "tensorboard=false", "max_minutes=null"])
    result = train(cfg, progress=False)
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "grad_norm", "entropy", "reward_mean", "response_length"):
        assert math.isfinite(rows[-1][key]), key
    assert rows[-1]["grad_norm"] > 0 or rows[-1]["reward_std"] == 0
    assert 0 < rows[-1]["entropy"] < math.log(49152)
