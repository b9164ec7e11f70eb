"""The benchmark's markdown: the README section's tables, one per (dtype, threads) run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .common import PHASE_LABELS, PHASES


def write_report(out_dir: str | Path, stem: str, report: dict, render: Callable[[dict], str]) -> None:
    """``OUT/STEM.json`` (:func:`to_json`) and ``OUT/STEM.md`` (``render(report)``), the page printed too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = render(report)
    (out / f"{stem}.json").write_text(to_json(report))
    (out / f"{stem}.md").write_text(page)
    print("\n" + page)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def to_json(report: dict) -> str:
    """The report as JSON with one line per top-level key and per run: every raw step record is kept
    (for re-rendering and re-analysis) without the indentation that made it ~80 KB."""
    lines = []
    for key, value in report.items():
        if key == "runs" and isinstance(value, list):
            runs = ",\n".join("    " + json.dumps(r, separators=(",", ":")) for r in value)
            lines.append(f'  "runs": [\n{runs}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _s(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _load(m: dict, key: str) -> str:
    return " ".join(f"{x:.1f}" for x in m.get(key, ()))


def markdown(report: dict) -> str:
    m, setup = report["machine"], report["setup"]
    sp = report.get("sampling", {})
    gpu = m.get("device") == "cuda"
    lines = [f"Machine: {m['gpu'] + ' (CUDA ' + str(m.get('cuda')) + '), both libraries training on it; host ' if gpu else ''}"
             f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs (bf16 units: "
             f"{', '.join(m.get('bf16_flags', [])) or 'none'}); torch {m['torch']}, transformers {m['transformers']}, "
             f"TRL {m['trl']}. Load average (1, 5, 15 min) at start: {_load(m, 'load_average_at_start')}; at end: "
             f"{_load(m, 'load_average_at_end')}.", "",
             f"Task and rewards of `{' '.join([setup['config'], *setup['overrides']])}`; "
             f"SmolLM2-135M-Instruct, {sp.get('prompts_per_step')} prompts x {sp.get('samples_per_prompt')} samples, "
             f"<= {sp.get('max_new_tokens')} new tokens, temperature {sp.get('temperature')}, lr {report.get('lr')}, "
             f"GRPO, no KL, one update per batch; {setup['warmup']} warm-up + {setup['steps']} measured steps per "
             "library, alternating TRL / seqpg; medians over the measured steps. Wall: wall-clock seconds. CPU: the "
             "process's CPU seconds over all its threads (less inflated by other load on the machine).", ""]
    for d in ("fp32", "bf16"):
        if f"speedup_{d}" in report:
            lo, hi = report.get(f"speedup_range_{d}", (float("nan"), float("nan")))
            lines.append(f"- **{d}: seqpg's step is {report[f'speedup_{d}']:.2f}x faster than TRL's** "
                         f"(ratio of the medians; per round of one step each, {lo:.2f}x to {hi:.2f}x; "
                         f"CPU time {report[f'speedup_cpu_{d}']:.2f}x; {report[f'threads_{d}']} thread(s), "
                         f"where TRL was fastest); seqpg's training phase reaches {100 * report[f'mfu_{d}']:.1f}% "
                         f"of the measured {d} matmul peak ({100 * report[f'mfu_cpu_{d}']:.1f}% per CPU second); "
                         f"peak memory {100 * report[f'memory_ratio_{d}']:.0f}% of TRL's."
                         + (f" Its sampling runs at {100 * report[f'sampling_floor_share_{d}']:.1f}% of the speed of "
                            "its memory-bandwidth floor." if f"sampling_floor_share_{d}" in report else ""))
    for run in report["runs"]:
        s = run["summary"]
        trl, mine, pk = s["libraries"]["trl"], s["libraries"]["seqpg"], s["matmul_peak"]
        bw = s.get("memory_bandwidth")
        lines += ["", f"#### {run['dtype']}, {run['threads']} thread(s); {run['dtype']} matmul peak "
                      f"{pk['flops_per_s'] / 1e9:.0f} GFLOP/s (n = {pk['size']})"
                      + (f"; memory bandwidth {bw['read_bytes_per_s'] / 1e9:.1f} GB/s read, "
                         f"{bw['copy_bytes_per_s'] / 1e9:.1f} GB/s copy" if bw else ""), "",
                  "| phase | TRL wall s | seqpg wall s | seqpg / TRL | TRL CPU s | seqpg CPU s | seqpg / TRL (CPU) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for p in PHASES:
            tw, sw = trl["median_s"][p], mine["median_s"][p]
            tc, sc = trl["median_cpu_s"][p], mine["median_cpu_s"][p]
            lines.append(f"| {PHASE_LABELS[p]} | {_s(tw)} | {_s(sw)} | {sw / tw:.2f} | {_s(tc)} | {_s(sc)} | "
                         f"{sc / tc:.2f} |")
        tok_t, tok_s = trl["completion_tokens_per_s"], mine["completion_tokens_per_s"]
        fl_t, fl_s = trl["train_flops_per_step"], mine["train_flops_per_step"]
        lines += ["", "| | TRL | seqpg | seqpg / TRL |", "|---|---:|---:|---:|",
                  f"| completion tokens / s | {tok_t:.1f} | {tok_s:.1f} | {tok_s / tok_t:.2f} |",
                  f"| peak resident memory (MiB) | {trl['peak_rss_mib']:.0f} | {mine['peak_rss_mib']:.0f} | "
                  f"{s['memory_ratio_seqpg_over_trl']:.2f} |",
                  *([f"| peak GPU memory, torch tensors (MiB) | {trl['peak_gpu_mib']:.0f} | "
                     f"{mine['peak_gpu_mib']:.0f} | {s['gpu_memory_ratio_seqpg_over_trl']:.2f} |"]
                    if "gpu_memory_ratio_seqpg_over_trl" in s else []),
                  f"| model FLOPs of the training phase (GFLOP) | {fl_t / 1e9:.0f} | {fl_s / 1e9:.0f} | "
                  f"{fl_s / fl_t:.2f} |",
                  f"| MFU, training phase (wall) | {100 * trl['mfu_training']:.1f}% | "
                  f"{100 * mine['mfu_training']:.1f}% | |",
                  f"| MFU, training phase (CPU) | {100 * trl['mfu_training_cpu']:.1f}% | "
                  f"{100 * mine['mfu_training_cpu']:.1f}% | |",
                  f"| MFU, forward + backward only (wall) | {100 * trl['mfu_forward_backward']:.1f}% | "
                  f"{100 * mine['mfu_forward_backward']:.1f}% | |"]
        lines += floor_table(s)
    return "\n".join(lines) + "\n"


def floor_table(summary: dict) -> list[str]:
    """Each phase that has a floor against it, per library: the floor's seconds (median over the measured
    steps) and the share of the floor's speed the phase reaches (median over the steps of floor s / phase s;
    for training, the MFU).  Empty for a report without the memory bandwidth."""
    trl, mine = summary["libraries"]["trl"], summary["libraries"]["seqpg"]
    bw = summary.get("memory_bandwidth")
    if bw is None or "sampling_floor_s" not in mine:
        return []
    return ["", "| phase | its floor | TRL floor s | TRL share of the floor's speed | seqpg floor s | "
                "seqpg share of the floor's speed |", "|---|---|---:|---:|---:|---:|",
            f"| sampling | bytes its decode steps read (TRL {trl['sampling_bytes_per_step'] / 1e9:.2f} GB, seqpg "
            f"{mine['sampling_bytes_per_step'] / 1e9:.2f} GB per step) / {bw['read_bytes_per_s'] / 1e9:.1f} GB/s | "
            f"{_s(trl['sampling_floor_s'])} | {100 * trl['sampling_floor_share']:.1f}% | "
            f"{_s(mine['sampling_floor_s'])} | {100 * mine['sampling_floor_share']:.1f}% |",
            f"| training (log-prob forward, backward, optimizer step) | model FLOPs / "
            f"{summary['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s | {_s(trl['training_floor_s'])} | "
            f"{100 * trl['mfu_training']:.1f}% | {_s(mine['training_floor_s'])} | {100 * mine['mfu_training']:.1f}% |"]
