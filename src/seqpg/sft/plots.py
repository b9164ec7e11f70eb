"""The plots of an SFT run: training and held-out loss, token accuracy (RUN/plots/sft.png)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..rundir.runfiles import METRICS_FILE, read_jsonl


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_sft(run_dir: Path) -> Path | None:
    """Write RUN/plots/sft.png from metrics.jsonl; None when there is nothing to draw. A failure is a warning."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_jsonl(path)
        panels = [("NLL of assistant tokens", "loss", "eval/loss"),
                  ("Token accuracy (argmax)", "token_accuracy", "eval/token_accuracy")]
        if not any(_series(records, k)[0] for _, k, _ in panels):
            return None
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (title, train_key, eval_key) in zip(axes, panels):
            for key, label, fmt in ((train_key, "train (step's batch)", "-"), (eval_key, "held-out", "o-")):
                x, y = _series(records, key)
                if x:
                    ax.plot(x, y, fmt, label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        out = run_dir / "plots"
        out.mkdir(exist_ok=True)
        fig.tight_layout()
        fig.savefig(out / "sft.png", dpi=110)
        plt.close(fig)
        return out / "sft.png"
    except Exception as e:  # a plot must not cost a run
        warnings.warn(f"writing {run_dir / 'plots' / 'sft.png'} failed: {e!r}")
        return None
