"""What a resumed run may change, and how each change takes effect.

``seqpg train --resume RUN key=value ...`` continues RUN with overrides.  The checkpoint restores
the optimizer (its learning rates, weight decay and betas), the LR scheduler (its base rates) and
the KL controller (its coefficient, target and horizon); left alone, that restore would undo an
override of those keys while config.yaml claimed it.  So:

* :func:`resume_changes` compares the run's config.yaml with the new configuration before anything
  loads, and refuses by name the keys that cannot change mid-run (``FROZEN``: the model, the
  prompts, the algorithm family, the group size, the seed);
* :func:`apply_resume_changes` sets the changed restored values again after the restore (every other
  key is read from the configuration each step, so it takes effect by itself);
* :func:`record_resume_changes` appends ``{"step", "changes": {key: {"from", "to"}}}`` to
  ``RUN/config_history.jsonl`` (the step is the first one trained with the new values) and prints
  the change; config.yaml then holds the configuration the run continues with (the earlier one is
  kept aside by :class:`seqpg.rundir.runlog.RunLogger`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig, load_config, to_dict

HISTORY_FILE = "config_history.jsonl"

FROZEN_PREFIXES = ("model.", "task.")
"""Sections that cannot change mid-run: the weights and the prompt stream were built from them."""
FROZEN = ("algo.name", "algo.advantage", "algo.critic", "algo.kl_reference", "sampling.samples_per_prompt", "seed")
"""Keys that cannot change mid-run: the algorithm, the critic's layout, the group size, the seed
of every random stream."""
RESTORED = ("optim.lr", "algo.critic_lr", "optim.warmup_steps", "optim.weight_decay", "optim.betas",
            "algo.kl_coef", "algo.kl_target", "algo.kl_horizon")
"""Keys whose values the checkpoint restores (optimizer, scheduler, KL controller); set again on change."""


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in ("params", "advantage_params", "loss_params"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(run_dir: str | os.PathLike, cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """``{key: {"from": old, "to": new}}`` between RUN/config.yaml and ``cfg``; frozen keys refused."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    old, new = _flat(to_dict(load_config(path))), _flat(to_dict(cfg))
    changes = {k: {"from": old.get(k), "to": v} for k, v in new.items() if old.get(k) != v and k != "run_dir"}
    frozen = [k for k in changes if k in FROZEN or k.startswith(FROZEN_PREFIXES)]
    if frozen:
        was = ", ".join(f"{k}={changes[k]['from']!r}" for k in frozen)
        raise ConfigError(f"--resume cannot change {', '.join(frozen)} mid-run (the checkpoint was trained with "
                          f"{was}); drop those overrides, or start a new run_dir")
    kt = changes.get("algo.kl_target")
    if kt is not None and (kt["from"] is None) != (kt["to"] is None):
        raise ConfigError("--resume cannot switch algo.kl_target between null (fixed KL coefficient) and a number "
                          "(adaptive controller) mid-run; change its value only, or start a new run_dir")
    return changes


def apply_resume_changes(changes: dict[str, dict[str, Any]], cfg: TrainConfig, optimizer, scheduler,
                         kl_ctl) -> None:
    """Set the changed values that the checkpoint's restore overwrote (see ``RESTORED``)."""
    o, a = cfg.optim, cfg.algo
    groups = optimizer.param_groups
    if {"optim.lr", "algo.critic_lr", "optim.warmup_steps"} & changes.keys():
        bases = [o.lr] + [a.critic_lr or 10 * o.lr] * (len(groups) - 1)  # as build_optimizer sets them
        scheduler.base_lrs = list(bases)
        for g, base, fn in zip(groups, bases, scheduler.lr_lambdas):
            g["initial_lr"], g["lr"] = base, base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in groups]
    for g in groups:
        if "optim.weight_decay" in changes:
            g["weight_decay"] = o.weight_decay
        if "optim.betas" in changes:
            g["betas"] = tuple(o.betas)
    if "algo.kl_coef" in changes:
        kl_ctl.value = float(a.kl_coef)
    if "algo.kl_target" in changes and hasattr(kl_ctl, "target"):
        kl_ctl.target = float(a.kl_target)
    if "algo.kl_horizon" in changes and hasattr(kl_ctl, "horizon"):
        kl_ctl.horizon = float(a.kl_horizon)


def record_resume_changes(run_dir: str | os.PathLike, step: int, changes: dict[str, dict[str, Any]]) -> None:
    """Append the changes, effective from ``step``, to RUN/config_history.jsonl and say them on stderr."""
    if not changes:
        return
    line = json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes})
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    said = ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items())
    print(f"seqpg: resuming with changes from step {step}: {said} (recorded in {HISTORY_FILE})", file=sys.stderr)
