"""Run logs: metrics/samples lines, non-finite values, truncation on resume (no duplicates), config,
TensorBoard scalars, disabled ranks, Timer, progress bar, and the PNG plots."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seqpg.rundir.plots import plot_before_after, plot_run
from seqpg.rundir.runfiles import read_jsonl
from seqpg.rundir.runlog import RunLogger, Timer, progress_bar

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_steps(log: RunLogger, steps, tag: str = "a") -> None:
    for step in steps:
        log.log_metrics(step, {"reward_mean": float(step), "tag_is_b": float(tag == "b")})
        log.log_samples(step, [{"prompt": f"p{step}", "completion": tag, "reward": 1.0}] * 2)


def test_metrics_and_samples_lines(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_metrics(1, {"reward_mean": torch.tensor(0.5), "n": np.int64(3), "kl": float("nan"),
                            "grad_norm": float("inf"), "clipped": True, "reward": {"vader": np.float32(0.25)}})
        log.log_samples(1, [{"prompt": "hi", "completion": "there", "reward": 0.5, "scores": {"vader": float("-inf")},
                             "advantage": torch.tensor(0.125)}])
    (m,) = _lines(tmp_path / "metrics.jsonl")
    assert m["step"] == 1 and isinstance(m["wall_time"], float)
    assert {k: v for k, v in m.items() if k not in ("step", "wall_time")} == {
        "reward_mean": 0.5, "n": 3, "kl": None, "grad_norm": None, "clipped": 1, "reward/vader": 0.25}
    assert _lines(tmp_path / "samples.jsonl") == [{"step": 1, "prompt": "hi", "completion": "there", "reward": 0.5,
                                                   "scores": {"vader": None}, "advantage": 0.125}]


def test_bad_values_are_named(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(TypeError, match="'note' is str"):
        log.log_metrics(1, {"note": "hello"})
    with pytest.raises(TypeError, match="'vec' has more than one element"):
        log.log_metrics(1, {"vec": torch.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
        log.log_metrics(1, {"step": 1})
    with pytest.raises(TypeError, match=r"sample\['obj'\] is a object"):
        log.log_samples(1, [{"obj": object()}])
    log.close(plot=False)


def test_resume_drops_lines_after_the_checkpoint_and_a_torn_line(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    _log_steps(log, range(1, 6))  # the crashed run logged steps 1..5; its last checkpoint was step 3
    log.close(plot=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward_me')  # killed mid-write
    log = RunLogger(tmp_path, tensorboard=False, resume_step=3)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    _log_steps(log, range(4, 6), tag="b")
    log.close(plot=False)
    metrics = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["tag_is_b"]) for r in metrics] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
    samples = _lines(tmp_path / "samples.jsonl")
    assert [(r["step"], r["completion"]) for r in samples] == [
        (s, "a") for s in (1, 1, 2, 2, 3, 3)] + [(s, "b") for s in (4, 4, 5, 5)]


def test_corrupt_middle_line_is_an_error_not_silently_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        RunLogger(tmp_path, tensorboard=False, resume_step=3)


def test_new_run_refuses_to_mix_with_an_earlier_runs_logs(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    _log_steps(log, [1])
    log.close(plot=False)
    with pytest.raises(FileExistsError, match="resume_step"):
        RunLogger(tmp_path, tensorboard=False)


def test_config_written_and_an_earlier_different_one_kept(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False, config={"lr": 1e-5, "model": {"name": "tiny", "path": Path("/m")}})
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written == {"lr": 1e-5, "model": {"name": "tiny", "path": "/m"}}
    log.write_config({"lr": 1e-5, "model": {"name": "tiny", "path": Path("/m")}})  # unchanged: nothing kept aside
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.yaml"]
    log.write_config({"lr": 2e-5})
    aside = [p for p in tmp_path.glob("config.*.yaml") if p.name != "config.yaml"]
    assert len(aside) == 1 and yaml.safe_load(aside[0].read_text())["lr"] == 1e-5
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"lr": 2e-5}
    log.close(plot=False)


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with RunLogger(run, enabled=False, config={"a": 1}, plot_every=1) as log:
        log.log_metrics(1, {"reward_mean": 1.0})
        log.log_samples(1, [{"prompt": "p"}])
        assert log.plot() == []
    assert not run.exists()


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path)
    _log_steps(log, range(1, 6))
    log.close(plot=False)
    log = RunLogger(tmp_path, resume_step=3)
    _log_steps(log, range(4, 6), tag="b")
    log.close(plot=False)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("tag_is_b")
    assert [(e.step, e.value) for e in events] == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 1.0), (5, 1.0)]


def test_timer_adds_up_phases():
    ticks = iter([0.0, 1.5, 10.0, 10.25, 20.0, 21.0])
    timer = Timer(clock=lambda: next(ticks))
    with timer("sample"):
        pass
    with timer("update"):
        pass
    with pytest.raises(RuntimeError):
        with timer("sample"):  # an exception still counts the time spent
            raise RuntimeError("boom")
    assert timer.seconds == {"sample": 2.5, "update": 0.25}
    timer.reset()
    assert timer.seconds == {}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_reward_and_speed_only_on_a_tty():
    out = _Tty()
    bar = progress_bar(10, initial=2, file=out)
    bar.update({"reward_mean": 0.4567, "tokens_per_s": 123.4})
    bar.close()
    text = out.getvalue()
    assert "3/10" in text and "reward=0.457" in text and "tok/s=123.4" in text
    for bar in (progress_bar(10, file=io.StringIO()), progress_bar(10, file=_Tty(), enabled=False)):
        assert bar.disabled
        bar.update({"reward_mean": 1.0})
        bar.close()
        assert bar._bar.disable


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _synthetic_run(run: Path, steps: int = 30, with_eval: bool = True) -> None:
    with RunLogger(run, tensorboard=False) as log:
        for s in range(1, steps + 1):
            m = {"reward_mean": 1 - math.exp(-s / 10), "reward_std": 0.2, "reward/vader": 0.5, "reward/length": 0.1,
                 "kl": 0.01 * s, "kl_coef": 0.05 + 0.001 * s, "response_length": 30 - s / 3, "truncated_frac": 0.1,
                 "gns/trace_cov": 40.0 + s, "gns/grad_sq": 1.5 - (s % 3), "gns/b_simple": (40.0 + s) / (1.5 - (s % 3)),
                 "collapse/flat_groups": float(s > 20), "collapse/distinct_2": 0.9 - 0.02 * s,
                 "collapse/shared_opening": 0.01 * s, "collapse/distinct_in_group": 1.0}
            if with_eval and s % 10 == 0:
                m.update({"eval/mean_reward": 0.1 * s, "eval/se_reward": 0.05, "eval/accuracy": 0.02 * s,
                          "eval/se_accuracy": float("nan")})
            log.log_metrics(s, m)
    # close() wrote the plots already; plot_run is what it calls


def test_plot_run_writes_all_plots(tmp_path):
    _synthetic_run(tmp_path)
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["collapse.png", "eval.png", "gradient_noise.png", "kl.png",
                                             "response_length.png", "reward.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000


def test_plot_run_tolerates_missing_keys(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "reward_mean": 0.1 * s, "kl": None if s == 2 else 0.01}) + "\n")
        f.write('{"step": 6, "reward')  # a torn last line
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["kl.png", "reward.png"]
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_run(tmp_path) == []  # no data yet: nothing to draw, no error
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nowhere")


def test_plot_every_writes_plots_during_the_run(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False, plot_every=2)
    log.log_metrics(1, {"reward_mean": 0.1})
    assert not (tmp_path / "plots").exists()
    log.log_metrics(2, {"reward_mean": 0.2})
    assert (tmp_path / "plots" / "reward.png").is_file()
    log.close(plot=False)


def test_plot_before_after(tmp_path):
    before = {"n_prompts": 50, "mean_reward": 0.2, "se_reward": 0.03, "accuracy": 0.1, "se_accuracy": 0.04}
    after = {"n_prompts": 50, "mean_reward": 0.7, "se_reward": 0.02, "accuracy": 0.6, "se_accuracy": 0.07}
    path = plot_before_after(before, after, tmp_path / "eval" / "before_after.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    # Reward only (a task without correctness) is fine; nothing to plot is an error naming the keys.
    plot_before_after({"mean_reward": -0.2}, {"mean_reward": 0.3, "se_reward": float("nan")}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="mean_reward"):
        plot_before_after({"reward": 1}, {"reward": 2}, tmp_path / "x.png")


def test_read_jsonl_skips_only_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
