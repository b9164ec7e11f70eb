"""The benchmark's bookkeeping on synthetic records (no TRL, no timing asserted)."""

from __future__ import annotations

import pytest
import torch

from seqpg.apps.bench.common import PHASES, BackwardClock, phase_times, weighted_scores
from seqpg.apps.bench.compare import headline, summarise
from seqpg.apps.bench.learning import curve_difference, held_out_track, time_to_target
from seqpg.apps.bench.report import markdown


def test_phase_times_from_marks():
    marks = {"a": (1.0, 10.0), "b": (3.0, 11.5), "c": (6.0, 12.0)}
    out = phase_times(marks, {"first": ("a", "b"), "second": ("b", "c"), "all": ("a", "c")})
    assert out == {"wall": {"first": 2.0, "second": 3.0, "all": 5.0}, "cpu": {"first": 1.5, "second": 0.5, "all": 2.0}}


def test_backward_clock_sees_every_backward_and_nothing_else():
    x = torch.ones(3, requires_grad=True)
    clock = BackwardClock()
    with clock:
        (x * 2).sum().backward()
        (x ** 2).sum().backward()
    assert len(clock.spans) == 2 and all(end >= start for start, end in clock.spans)
    assert torch.equal(x.grad, torch.full((3,), 4.0))


def _record(step, flops=1e9, warmup=False):
    phases = {"sampling": 0.5 * step, "scoring": 0.01, "logprob_forward": 0.2 * step, "backward": 0.3 * step,
              "optimizer": 0.1, "step": 0.81 + step}
    return {**phases, "cpu": dict(phases), "completion_tokens": 100, "train_flops": flops, "reward": 0.5,
            "threads": 1, "warmup": warmup}


def _raw():
    return {"steps": {"trl": [_record(9.0, warmup=True)] + [_record(s) for s in (3.0, 4.0, 5.0)],
                      "seqpg": [_record(9.0, warmup=True)] + [_record(s) for s in (1.0, 2.0, 3.0)]},
            "peak_rss_mib": {"trl": 2000.0, "seqpg": 1000.0}, "initial_eval": {"trl": None, "seqpg": None}}


def test_summarise_medians_ratios_and_mfu():
    peak = {"flops_per_s": 1e10, "flops_per_cpu_s": 1e10, "size": 1024}
    s = summarise(_raw(), peak)
    trl, mine = s["libraries"]["trl"], s["libraries"]["seqpg"]
    assert trl["median_s"]["step"] == pytest.approx(4.81) and mine["median_s"]["step"] == pytest.approx(2.81)
    assert s["speedup"] == pytest.approx(4.81 / 2.81)
    assert s["speedup_per_round"] == pytest.approx([3.81 / 1.81, 4.81 / 2.81, 5.81 / 3.81])  # warm-up left out
    assert s["ratio_seqpg_over_trl"]["sampling"] == pytest.approx(1.0 / 2.0)
    # training phase of the median seqpg step: 0.2*2 + 0.3*2 + 0.1 = 1.1 s for 1e9 FLOPs at a 1e10 peak
    assert mine["mfu_training"] == pytest.approx(1e9 / 1.1 / 1e10)
    assert s["memory_ratio_seqpg_over_trl"] == 0.5
    assert set(s["ratio_seqpg_over_trl"]) == set(PHASES)


def test_headline_takes_the_thread_count_where_trl_is_fastest():
    peak = {"flops_per_s": 1e10, "flops_per_cpu_s": 1e10, "size": 1024}
    slow_trl = _raw()
    for rec in slow_trl["steps"]["trl"]:
        rec["step"] += 10
    runs = [{"dtype": "fp32", "threads": 1, "summary": summarise(_raw(), peak)},
            {"dtype": "fp32", "threads": 2, "summary": summarise(slow_trl, peak)}]
    h = headline(runs)
    assert h["threads_fp32"] == 1 and h["speedup_fp32"] == pytest.approx(4.81 / 2.81)
    assert h["speedup_range_fp32"] == pytest.approx([5.81 / 3.81, 3.81 / 1.81])
    report = {"machine": {"cpu_model": "x", "logical_cpus": 2, "torch": "t", "transformers": "t", "trl": "t",
                          "load_average_at_start": (0.0, 0.0, 0.0)},
              "setup": {"config": "examples/demo.yaml", "overrides": [], "warmup": 1, "steps": 3}, "lr": 2e-5,
              "sampling": {"prompts_per_step": 2, "samples_per_prompt": 8, "max_new_tokens": 32, "temperature": 1.0},
              "runs": runs, **h}
    text = markdown(report)
    assert "fp32: seqpg's step is 1.71x faster than TRL's** (ratio of the medians; per round of one step each, " \
           "1.52x to 2.10x" in text and text.count("| whole step |") == 2


def test_a_gpu_run_reports_gpu_memory_and_names_the_card():
    peak = {"flops_per_s": 1e14, "flops_per_cpu_s": 1e14, "size": 8192}
    raw = dict(_raw(), peak_gpu_mib={"trl": 800.0, "seqpg": 200.0})
    s = summarise(raw, peak)
    assert s["gpu_memory_ratio_seqpg_over_trl"] == 0.25 and "gpu_memory_ratio_seqpg_over_trl" not in summarise(
        _raw(), peak)
    runs = [{"dtype": "bf16", "threads": 8, "summary": s}]
    h = headline(runs)
    assert h["gpu_memory_ratio_bf16"] == 0.25
    report = {"machine": {"cpu_model": "x", "logical_cpus": 16, "torch": "t", "transformers": "t", "trl": "t",
                          "device": "cuda", "gpu": "NVIDIA H200", "cuda": "13.0"},
              "setup": {"config": "examples/demo.yaml", "overrides": [], "warmup": 1, "steps": 3}, "lr": 2e-5,
              "sampling": {}, "runs": runs, **h}
    text = markdown(report)
    assert text.startswith("Machine: NVIDIA H200 (CUDA 13.0), both libraries training on it")
    assert "| peak GPU memory, torch tensors (MiB) | 800 | 200 | 0.25 |" in text


def test_curve_difference_and_time_to_target():
    c = curve_difference([0.5, 0.7, 0.6], [0.4, 0.6, 0.5])
    assert c["difference"] == pytest.approx(0.1) and c["se"] == pytest.approx((0.01 / 3 + 0.01 / 3) ** 0.5)
    raw = {"initial_eval": {"a": {"mean_reward": 0.3, "se_reward": 0.05, "seconds": 1.0},
                            "b": {"mean_reward": 0.3, "se_reward": 0.05, "seconds": 1.0}},
           "steps": {"a": [{"step": 2.0}, {"step": 2.0, "eval": {"mean_reward": 0.5, "se_reward": 0.05}}],
                     "b": [{"step": 1.0}, {"step": 1.0, "eval": {"mean_reward": 0.4, "se_reward": 0.05}}]}}
    tracks = {name: held_out_track(raw, name) for name in ("a", "b")}
    assert [p["train_seconds"] for p in tracks["a"]] == [0.0, 4.0]
    t = time_to_target(tracks)
    assert t["target"] == 0.4 and t["reached_above_start"]
    assert t["a"] == {"step": 2, "train_seconds": 4.0} and t["b"] == {"step": 2, "train_seconds": 2.0}


def test_weighted_scores_sum_the_scorers_like_score_batch():
    from seqpg.batch import Prompt
    from seqpg.rewards.scorers import make_scorer

    scorers = [(make_scorer("length", unit="chars"), 0.5), (make_scorer("contains", name="has_a"), 2.0)]
    prompts = [Prompt("p", "0", meta={"answer": "a"}), Prompt("q", "1", meta={"answer": "a"})]
    assert weighted_scores(scorers, prompts, ["abc", "xy"]) == [0.5 * 3 + 2.0, 0.5 * 2]


@pytest.mark.parametrize("argv", [["--warmup", "-1"], ["--steps", "0"]])
def test_bench_rejects_bad_step_counts_before_needing_trl(argv):
    from seqpg.apps.cli import main

    with pytest.raises(SystemExit, match="--warmup >= 0 and --steps >= 1"):
        main(["bench", "--dtypes", "bf16", *argv])


def test_bench_on_cuda_is_refused_where_no_gpu_is_visible(monkeypatch):
    from seqpg.apps.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda, but no CUDA device is visible"):
        main(["bench", "--device", "cuda"])
