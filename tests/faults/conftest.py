"""Fault-injection runs on the tiny model: prompts, an uninterrupted reference run, a disarmed reward."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fault_rewards (by `module:function`) and faultkit

from fault_rewards import ARMED  # noqa: E402
from faultkit import overrides  # noqa: E402

from seqpg.config import load_config  # noqa: E402
from seqpg.training.trainer import train  # noqa: E402

_WORDS = ["cat", "dog", "sun", "sea", "sky", "red", "big", "tea", "cup", "map", "owl", "fox"]


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in _WORDS))
    return path


@pytest.fixture(autouse=True)
def disarmed():
    ARMED["calls_left"] = None
    yield
    ARMED["calls_left"] = None


@pytest.fixture(scope="session")
def reference(prompt_file, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run (checkpoints of steps 2 and 4): what every recovered run must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(None, overrides(prompt_file, run)), progress=False)
    return run


@pytest.fixture
def copy_of(tmp_path):
    """``copy_of(run)``: a copy of a run directory to damage."""
    def make(run: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(run, dst)
        return dst
    return make
