"""What a run leaves behind: config, per-step metrics, samples, TensorBoard scalars and plots.

::

    RUN/config.yaml         the resolved configuration (an earlier, different one is kept aside)
    RUN/metrics.jsonl       one JSON object per logged step: {"step", "wall_time", <metrics>...}; the held-out
                            evaluation (eval_every) logs its eval/* metrics as a line of its own at its step
    RUN/samples.jsonl       one JSON object per sample: {"step", "prompt", "completion", ...}
    RUN/tensorboard/        TensorBoard event files, one scalar per metric key
    RUN/plots/*.png         written by :func:`seqpg.rundir.plots.plot_run` every ``plot_every`` steps and at close

Every line is flushed and fsynced as it is written.  Resuming from the checkpoint of step k
(``resume_step=k``) drops the lines of steps after k, a torn last line and TensorBoard events
after k, so a crash between a checkpoint and later log lines leaves no duplicates.
Non-finite numbers are written as JSON ``null``.  Only the main process logs: pass
``enabled=False`` on the others and every method does nothing.

Also here: :class:`Timer` (seconds per phase of a step) and :func:`progress_bar` (a tqdm bar).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

import yaml

from .runfiles import CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, read_jsonl
WARNINGS_FILE = "warnings.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "wall_time")


class RunLogger:
    """Writes a run's config, metrics, samples, TensorBoard scalars and plots under ``run_dir``.

    ``resume_step``: None for a new run (``run_dir`` must not yet hold metrics or samples), or
    the step of the checkpoint the run continues from (log lines of later steps are dropped).
    ``plot_every``: also write the plots every N logged steps (None: only at :meth:`close`).
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, plot_every: int | None = None,
                 config: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.plot_every = plot_every
        self._files: dict[str, TextIO] = {}
        self._tb = None
        if not enabled:
            return
        if plot_every is not None and plot_every < 1:
            raise ValueError(f"RunLogger: plot_every must be >= 1 or None, got {plot_every}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logs = [self.run_dir / METRICS_FILE, self.run_dir / SAMPLES_FILE]
        if resume_step is None:
            used = [p for p in logs if p.is_file() and p.stat().st_size > 0]
            if used:
                raise FileExistsError(
                    f"RunLogger: {', '.join(map(str, used))} already hold(s) the log of an earlier run. To continue "
                    "that run pass resume_step=<step of the checkpoint you loaded> (seqpg train --resume); to "
                    "start over choose a new run directory or delete those files")
        else:
            for p in logs:
                truncate_jsonl(p, resume_step)
        if tensorboard:
            self._tb = _summary_writer(self.run_dir / TENSORBOARD_DIR,
                                       None if resume_step is None else resume_step + 1)
        for p in logs:
            self._files[p.name] = open(p, "a", encoding="utf-8")
        if config is not None:
            self.write_config(config)

    # -- writing ---------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any] | Any) -> None:
        """Write ``config.yaml`` (a dict or a dataclass); a different existing one is kept aside."""
        if not self.enabled:
            return
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        text = yaml.safe_dump(_plain(dict(config), "config"), sort_keys=False, allow_unicode=True)
        path = self.run_dir / CONFIG_FILE
        if path.is_file():
            old = path.read_text(encoding="utf-8")
            if old == text:
                return
            aside = self.run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
            _atomic_write(aside, old)
        _atomic_write(path, text)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` and the scalars to TensorBoard.

        ``metrics`` maps names to numbers (python, numpy or one-element tensors); nested dicts
        are flattened with ``/`` (``{"reward": {"mean": 1}}`` -> ``reward/mean``).
        """
        if not self.enabled:
            return
        flat = _flatten_metrics(metrics)
        clash = [k for k in _RESERVED if k in flat]
        if clash:
            raise ValueError(f"log_metrics: metric names {clash} are reserved; the step is the first argument")
        self._append(METRICS_FILE, {"step": int(step), "wall_time": round(time.time(), 3), **flat})
        if self._tb is not None:
            for key, value in flat.items():
                if value is not None:
                    self._tb.add_scalar(key, value, int(step))
        if self.plot_every is not None and step % self.plot_every == 0:
            self.plot()

    def log_samples(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        """Append one line per sample (prompt, completion, reward, scores, advantage, ...) to ``samples.jsonl``."""
        if not self.enabled:
            return
        for row in samples:
            if "step" in row:
                raise ValueError("log_samples: a sample has its own 'step'; the step is the first argument")
            self._append(SAMPLES_FILE, {"step": int(step), **_plain(dict(row), "sample")}, sync=False)
        self._sync(SAMPLES_FILE)

    def log_warning(self, step: int, message: str) -> None:
        """Append ``{"step", "wall_time", "warning"}`` to RUN/warnings.jsonl (a rare event: opened each time)."""
        if not self.enabled:
            return
        with open(self.run_dir / WARNINGS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "wall_time": round(time.time(), 3), "warning": message}) + "\n")

    def plot(self) -> list[Path]:
        """Write the PNG plots now; a failure is reported as a warning, never ends the run."""
        if not self.enabled:
            return []
        from .plots import plot_run

        try:
            return plot_run(self.run_dir)
        except Exception as e:  # a plot must not cost a training run
            warnings.warn(f"RunLogger: writing plots under {self.run_dir / 'plots'} failed: {e!r}")
            return []

    def close(self, *, plot: bool = True) -> None:
        """Flush and close everything; write the plots (unless ``plot=False``)."""
        if not self.enabled or not self._files:
            return
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if plot:
            self.plot()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _append(self, name: str, record: Mapping[str, Any], sync: bool = True) -> None:
        if name not in self._files:
            raise RuntimeError(f"RunLogger for {self.run_dir} is closed; create a new one to log more")
        self._files[name].write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        if sync:
            self._sync(name)

    def _sync(self, name: str) -> None:
        f = self._files[name]
        f.flush()
        os.fsync(f.fileno())


def _summary_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("RunLogger(tensorboard=True) needs the tensorboard package: pip install tensorboard, "
                          "or pass tensorboard=False") from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------



def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (and a torn last line), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", -math.inf) <= last_step]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    if text != path.read_text(encoding="utf-8"):
        _atomic_write(path, text)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | None]:
    flat: dict[str, float | int | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"log_metrics: metric names must be strings, got {key!r}")
        name = prefix + key
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, name + "/"))
        else:
            flat[name] = _number(value, name)
    return flat


def _number(value: Any, name: str) -> float | int | None:
    """A JSON number from a python / numpy / one-element tensor value; None when not finite."""
    if value is None:
        return None
    if not isinstance(value, (bool, int, float)) and hasattr(value, "item"):  # tensors, numpy values
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:
            raise TypeError(f"log_metrics: {name!r} has more than one element; log a scalar") from e
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"log_metrics: {name!r} is {type(value).__name__} {value!r:.80}, not a number; "
                    "log a float (e.g. tensor.item()) or leave it out")


def _plain(obj: Any, where: str) -> Any:
    """JSON/YAML-safe copy: tensors and numpy values to python, non-finite floats to None, Paths to str."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return _plain(obj.tolist(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj), where)
    raise TypeError(f"{where} is a {type(obj).__name__}, which cannot be written as JSON/YAML; "
                    "convert it to a number, string, list or dict")


# ---------------------------------------------------------------------------------------------
# Timing and progress
# ---------------------------------------------------------------------------------------------

@dataclass
class Timer:
    """Seconds spent per phase: ``with timer("sample"): ...``; repeated phases add up."""

    seconds: dict[str, float] = field(default_factory=dict)
    """Phase name -> total seconds so far."""
    clock: Callable[[], float] = time.perf_counter
    """The clock read at the start and end of each phase."""

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + (self.clock() - start)

    def reset(self) -> None:
        self.seconds.clear()


class ProgressBar:
    """A tqdm bar over training steps showing reward and speed; silent when disabled or not a TTY."""

    REWARD_KEYS = ("reward_mean", "reward/mean", "reward")
    SPEED_KEYS = (("tokens_per_s", "tok/s"), ("samples_per_s", "samples/s"))

    def __init__(self, total: int | None, *, initial: int = 0, enabled: bool = True, file: TextIO | None = None,
                 desc: str = "train"):
        from tqdm import tqdm

        file = sys.stderr if file is None else file
        self._file = file
        self.disabled = not enabled or not (hasattr(file, "isatty") and file.isatty())
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=file, dynamic_ncols=True,
                         disable=self.disabled)

    def update(self, metrics: Mapping[str, Any] | None = None, n: int = 1) -> None:
        """Advance by ``n`` steps and show the reward and tokens/s (or samples/s) found in ``metrics``."""
        if self.disabled:
            return
        postfix = {}
        for key in self.REWARD_KEYS:
            if metrics and isinstance(metrics.get(key), (int, float)):
                postfix["reward"] = f"{metrics[key]:.3f}"
                break
        if not postfix and metrics and isinstance(metrics.get("loss"), (int, float)):  # seqpg sft
            postfix["loss"] = f"{metrics['loss']:.3f}"
        for key, label in self.SPEED_KEYS:
            if metrics and isinstance(metrics.get(key), (int, float)):
                postfix[label] = f"{metrics[key]:.1f}"
                break
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def warn(self, message: str) -> None:
        """Print ``message`` to the bar's stream (above the bar, or alone when the bar is off) and keep a mark."""
        if not self.disabled:
            self._bar.set_postfix_str("COLLAPSED? see warning", refresh=False)
        self._bar.write(f"seqpg: warning: {message}", file=self._file)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, *, initial: int = 0, enabled: bool = True, file: TextIO | None = None,
                 desc: str = "train") -> ProgressBar:
    """A :class:`ProgressBar` from step ``initial`` to ``total`` (stderr unless ``file``)."""
    return ProgressBar(total, initial=initial, enabled=enabled, file=file, desc=desc)
