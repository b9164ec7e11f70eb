"""PNG plots of a run (from its ``metrics.jsonl``) and of a before/after evaluation.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer, never through
``pyplot``: nothing needs a display and the caller's matplotlib backend is left alone.  Each
file is written to a temporary name and renamed, so a viewer never sees half a PNG.

Keys read from ``metrics.jsonl`` (the first present of each list; everything is optional and a
plot whose data is absent is skipped):

* reward: ``reward_mean`` ± ``reward_std`` (or ``reward/mean`` ± ``reward/std``); per scorer
  ``reward/<scorer>`` (or ``reward/<scorer>/mean``)
* KL: ``kl`` (or ``kl/mean``), and the coefficient ``kl_coef`` on a second axis
* response length: ``response_length`` (or ``response_length/mean``), ``truncated_frac``
* evaluation: ``eval/mean_reward`` ± ``eval/se_reward``, ``eval/accuracy`` ± ``eval/se_accuracy``
  (also ``eval/reward_mean`` / ``eval/reward_se``, ``eval/accuracy_se``: what training with ``eval_every``
  logs, see :mod:`seqpg.training.periodic_eval`)
* collapse watch: ``collapse/flat_groups``, ``collapse/distinct_2``, ``collapse/shared_opening``,
  ``collapse/distinct_in_group`` (fractions; see :mod:`seqpg.training.collapse`)
* gradient noise scale: ``gns/b_simple`` per step, and the ratio of the moving means of ``gns/trace_cov`` and
  ``gns/grad_sq`` over ``GNS_WINDOW`` steps (McCandlish et al. average numerator and denominator apart)
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .runfiles import METRICS_FILE, read_jsonl

PLOTS_DIR = "plots"

REWARD_MEAN = ("reward_mean", "reward/mean")
REWARD_STD = ("reward_std", "reward/std")
KL = ("kl", "kl/mean")
KL_COEF = ("kl_coef",)
LENGTH = ("response_length", "response_length/mean")
TRUNCATED = ("truncated_frac",)
EVAL_REWARD = ("eval/mean_reward", "eval/reward_mean", "eval/reward/mean")
EVAL_REWARD_SE = ("eval/se_reward", "eval/reward_se", "eval/reward/se")
EVAL_ACCURACY = ("eval/accuracy", "eval/accuracy/mean")
EVAL_ACCURACY_SE = ("eval/se_accuracy", "eval/accuracy_se", "eval/accuracy/se")
GNS_B_SIMPLE, GNS_TRACE, GNS_GRAD_SQ = ("gns/b_simple",), ("gns/trace_cov",), ("gns/grad_sq",)
GNS_WINDOW = 10
COLLAPSE = (("collapse/flat_groups", "groups with no reward spread", "#d62728"),
            ("collapse/distinct_2", "distinct word bigrams (distinct-2)", "#1f77b4"),
            ("collapse/shared_opening", "completions opening alike across prompts", "#ff7f0e"),
            ("collapse/distinct_in_group", "distinct completions per group", "#2ca02c"))
_NOT_SCORERS = {"mean", "std", "se", "sem", "min", "max"}
_SCORER_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write ``run_dir/plots/{reward,kl,response_length,eval,collapse,gradient_noise}.png`` from ``metrics.jsonl``; return the files written."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"plot_run: {path} does not exist; expected the metrics log a RunLogger writes "
                                "into the run directory")
    records = [r for r in read_jsonl(path) if isinstance(r.get("step"), (int, float))]
    out = run_dir / PLOTS_DIR
    written = []
    for name, draw in (("reward", _reward), ("kl", _kl), ("response_length", _length), ("eval", _eval),
                        ("collapse", _collapse), ("gradient_noise", _gradient_noise)):
        fig = draw(records)
        if fig is not None:
            out.mkdir(exist_ok=True)
            written.append(_save(fig, out / f"{name}.png"))
    return written


def plot_before_after(before: Mapping[str, Any] | Any, after: Mapping[str, Any] | Any, path: str | os.PathLike, *,
                      labels: tuple[str, str] = ("before", "after"), title: str = "Evaluation before and after training"
                      ) -> Path:
    """Bar chart of mean reward and accuracy (± standard error) before vs after training.

    ``before``/``after`` are dicts (or dataclasses such as ``EvalResult``) with ``mean_reward`` /
    ``se_reward`` and, optionally, ``accuracy`` / ``se_accuracy`` (also read: ``reward_mean``,
    ``reward_se``, ``accuracy_se``) and ``n_prompts``.
    """
    before, after = _as_dict(before), _as_dict(after)
    panels = []
    for label, keys, se_keys, unit_range in (
            ("Mean reward", ("mean_reward", "reward_mean", "reward/mean"), ("se_reward", "reward_se", "reward/se"),
             False),
            ("Accuracy", ("accuracy", "accuracy/mean"), ("se_accuracy", "accuracy_se", "accuracy/se"), True)):
        values = [_first(d, keys) for d in (before, after)]
        if all(v is not None for v in values):
            panels.append((label, values, [_first(d, se_keys) for d in (before, after)], unit_range))
    if not panels:
        raise ValueError("plot_before_after: before and after both need 'mean_reward' (and optionally 'se_reward', "
                         f"'accuracy', 'se_accuracy'); got keys {sorted(before)} and {sorted(after)}")
    fig = _figure(width=3.6 * len(panels) + 0.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = ("#9e9e9e", "#1f77b4")
    for ax, (label, values, ses, unit_range) in zip(axes, panels):
        errs = [s if s is not None else 0.0 for s in ses]
        bars = ax.bar(list(labels), values, yerr=errs, capsize=8, color=colors, width=0.55,
                      error_kw={"elinewidth": 1.5})
        for bar, v, s in zip(bars, values, ses):
            text = f"{v:.3f}" + (f" ± {s:.3f}" if s is not None else "")
            tip = v + (s or 0.0) if v >= 0 else v - (s or 0.0)  # label beyond the error bar
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, tip), xytext=(0, 4 if v >= 0 else -4),
                        textcoords="offset points", ha="center", va="bottom" if v >= 0 else "top", fontsize=9)
        ax.set_title(label)
        ax.set_ylabel(label.lower() + (" (fraction correct)" if unit_range else ""))
        ax.margins(y=0.15)
        if unit_range:
            ax.set_ylim(0, 1.12)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    n = [d.get("n_prompts") for d in (before, after)]
    sub = f" (n = {n[0]} prompts; error bars: ± 1 standard error)" if n[0] and n[0] == n[1] else \
        " (error bars: ± 1 standard error)"
    fig.suptitle(title + sub, fontsize=11)
    return _save(fig, Path(path))


# ---------------------------------------------------------------------------------------------
# The run plots
# ---------------------------------------------------------------------------------------------

def _reward(records: list[dict]):
    steps, mean = _series(records, REWARD_MEAN)
    scorers = _scorer_keys(records)
    if not steps and not scorers:
        return None
    fig = _figure()
    ax = fig.subplots()
    if steps:
        std_steps, std = _series(records, REWARD_STD)
        if std_steps == steps:
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color="#1f77b4", alpha=0.2, linewidth=0, label="± 1 std over samples")
        ax.plot(steps, mean, color="#1f77b4", linewidth=2, marker="." if len(steps) < 30 else None,
                label="mean reward (weighted total)")
    for i, (name, key) in enumerate(scorers):
        s_steps, s_vals = _series(records, (key,))
        ax.plot(s_steps, s_vals, linewidth=1, alpha=0.85, color=_SCORER_COLORS[i % len(_SCORER_COLORS)],
                label=f"scorer: {name}")
    _finish(ax, "Training reward", "reward")
    return fig


def _kl(records: list[dict]):
    steps, kl = _series(records, KL)
    if not steps:
        return None
    fig = _figure()
    ax = fig.subplots()
    ax.plot(steps, kl, color="#d62728", linewidth=1.8, label="KL(policy ‖ reference)")
    coef_steps, coef = _series(records, KL_COEF)
    adaptive = len(set(coef)) > 1  # a constant coefficient needs no axis of its own
    if adaptive:
        twin = ax.twinx()
        twin.plot(coef_steps, coef, color="#7f7f7f", linestyle="--", linewidth=1.2, label="KL coefficient β")
        twin.set_ylabel("KL coefficient β")
        _legend(ax, twin)
    _finish(ax, "KL divergence to the reference policy", "KL (nats per token)", legend=not adaptive)
    return fig


def _length(records: list[dict]):
    steps, length = _series(records, LENGTH)
    if not steps:
        return None
    fig = _figure()
    ax = fig.subplots()
    ax.plot(steps, length, color="#2ca02c", linewidth=1.8, label="mean response length")
    t_steps, truncated = _series(records, TRUNCATED)
    if t_steps:
        twin = ax.twinx()
        twin.plot(t_steps, truncated, color="#ff7f0e", linestyle="--", linewidth=1.2,
                  label="truncated at max length (fraction)")
        twin.set_ylabel("fraction truncated")
        twin.set_ylim(0, 1.05)
        _legend(ax, twin)
    _finish(ax, "Response length", "tokens", legend=not t_steps)
    return fig


def _eval(records: list[dict]):
    panels = [(label, _series_with_err(records, k, e))
              for label, k, e in (("Eval mean reward", EVAL_REWARD, EVAL_REWARD_SE),
                                  ("Eval accuracy", EVAL_ACCURACY, EVAL_ACCURACY_SE))]
    panels = [(label, s) for label, s in panels if s[0]]
    if not panels:
        return None
    fig = _figure(width=4.2 * len(panels) + 0.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, (steps, values, errs)) in zip(axes, panels):
        ax.errorbar(steps, values, yerr=errs, fmt="o-", capsize=4, color="#9467bd", label="± 1 standard error")
        _finish(ax, label, label.removeprefix("Eval ").lower())
        if "accuracy" in label:
            ax.set_ylim(0, 1.05)
    fig.suptitle("Held-out evaluation", fontsize=11)
    return fig


def _collapse(records: list[dict]):
    series = [(label, color, *_series(records, (key,))) for key, label, color in COLLAPSE]
    series = [x for x in series if x[2]]
    if not series:
        return None
    fig = _figure()
    ax = fig.subplots()
    for label, color, steps, values in series:
        ax.plot(steps, values, color=color, linewidth=1.5, label=label)
    ax.set_ylim(-0.03, 1.05)
    _finish(ax, "Collapse watch (the run warns when these stay bad: see warnings.jsonl)", "fraction")
    return fig


def _gradient_noise(records: list[dict]):
    steps, b_simple = _series(records, GNS_B_SIMPLE)
    if not steps:
        return None
    pairs = [(r["step"], _first(r, GNS_TRACE), _first(r, GNS_GRAD_SQ)) for r in records]
    pairs = [(st, t, g) for st, t, g in pairs if t is not None and g is not None]
    smooth_steps, smooth = [], []
    for i in range(len(pairs)):
        window = pairs[max(0, i + 1 - GNS_WINDOW):i + 1]
        g = sum(p[2] for p in window)
        if g > 0:
            smooth_steps.append(pairs[i][0])
            smooth.append(sum(p[1] for p in window) / g)
    fig = _figure()
    ax = fig.subplots()
    ax.plot(steps, b_simple, "o", color="#1f77b4", markersize=3, alpha=0.5, label="B_simple of the step")
    if smooth:
        ax.plot(smooth_steps, smooth, color="#1f77b4", linewidth=1.8,
                label=f"mean tr(Σ) / mean |G|² over {GNS_WINDOW} steps")
    ax.set_yscale("symlog", linthresh=1.0)
    _finish(ax, "Gradient noise scale (McCandlish et al. 2018)", "B_simple (samples)")
    return fig


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

LAB_PLOTS = (("variance_ratio", "gradient variance / REINFORCE without baseline", "ratio"),
             ("bias_factor", "expected gradient along the reference (1 = unbiased)", "factor"),
             ("samples", "samples to reach the target cosine to the reference", "samples"))


def plot_lab(table: Mapping[str, Mapping[str, tuple[float, float]]], out_dir: str | os.PathLike) -> list[Path]:
    """``out_dir/{variance_ratio,bias_factor,samples}.png``: one bar per estimator, ± its standard error
    (``table``: estimator -> figure -> (value, se), as :func:`seqpg.apps.lab.table` gives; infinite bars omitted)."""
    written = []
    names = list(table)
    for key, title, ylabel in LAB_PLOTS:
        vals = [table[n][key][0] for n in names]
        errs = [table[n][key][1] if math.isfinite(table[n][key][1]) else 0.0 for n in names]
        fig = _figure()
        ax = fig.add_subplot()
        ok = [i for i, v in enumerate(vals) if math.isfinite(v)]
        ax.bar([names[i] for i in ok], [vals[i] for i in ok], yerr=[errs[i] for i in ok], capsize=4,
               color="#1f77b4", alpha=0.8)
        if key != "samples":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelrotation=30)
        written.append(_save(fig, Path(out_dir) / f"{key}.png"))
    return written


def _first(d: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _series(records: list[dict], keys: Sequence[str]) -> tuple[list[float], list[float]]:
    """(steps, values) of the first key in ``keys`` present in any record; rows without it skipped."""
    for key in keys:
        pairs = [(r["step"], r[key]) for r in records
                 if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if pairs:
            return [p[0] for p in pairs], [float(p[1]) for p in pairs]
    return [], []


def _series_with_err(records: list[dict], keys, err_keys) -> tuple[list, list, list]:
    steps, values, errs = [], [], []
    for r in records:
        v = _first(r, keys)
        if v is not None:
            e = _first(r, err_keys)
            steps.append(r["step"])
            values.append(v)
            errs.append(e if e is not None else 0.0)
    return steps, values, errs


def _scorer_keys(records: list[dict]) -> list[tuple[str, str]]:
    """(scorer name, key) of the per-scorer reward series: ``reward/<name>`` or ``reward/<name>/mean``."""
    found: dict[str, str] = {}
    for r in records:
        for key in r:
            parts = key.split("/")
            if parts[0] != "reward" or len(parts) not in (2, 3) or parts[1] in _NOT_SCORERS:
                continue
            if len(parts) == 2 or parts[2] == "mean":
                found.setdefault(parts[1], key)
    return sorted(found.items())


def _as_dict(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def _figure(width: float = 7.5, height: float = 4.3):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _finish(ax, title: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _legend(ax, twin) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
