"""Helpers of the fault-injection tests: the 4-step tiny-model run they all use, and ways to compare runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from seqpg.rundir.checkpoint import latest_checkpoint
from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train

HERE = Path(__file__).parent
STEPS = 4
"""Every fault run is a 4-step run saving after steps 2 and 4 (``save_every=2``)."""
_TIMING = ("time/", "tokens_per_s", "wall_time")


def overrides(prompt_file: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model.name=tiny", "task.source=jsonl", f"task.name={prompt_file}", "task.eval_size=4",
            "task.train_size=8", "sampling.chat_template=false", "sampling.max_new_tokens=6",
            "sampling.prompts_per_step=4", "sampling.samples_per_prompt=4",
            "rewards=[{kind: callable, params: {fn: 'fault_rewards:fragile'}}]", "optim.lr=3e-2",
            "tensorboard=false", f"steps={STEPS}", "save_every=2", "keep_checkpoints=2", f"run_dir={run_dir}",
            "threads=1", *extra]


def maths(run_dir: Path) -> list[dict]:
    """The run's metric lines without the wall-clock fields (which differ between equal runs)."""
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def weights_sha(run_dir: Path) -> str:
    """The sha256 that the newest checkpoint's meta.json records for its weights."""
    meta = json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())
    return meta["files"]["model.safetensors"]["sha256"]


def subprocess_env() -> dict[str, str]:
    src = str(Path(__file__).parents[2] / "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, str(HERE), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def resume(prompt_file: Path, run_dir: Path, *extra: str):
    return train(load_config(None, overrides(prompt_file, run_dir, *extra)), resume=True, progress=False)
