"""kill -9 inside each stage of a checkpoint write, then --resume: the run ends exactly like an uninterrupted one.

The run is forked from the test process (no second start-up of torch) and SIGKILLs itself on
entering the stage while saving the checkpoint of step 4 (the last; step 2's is complete).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from faultkit import STEPS, maths, overrides, resume, weights_sha

import seqpg.rundir.checkpoint as ckpt_mod
import seqpg.rundir.checkpoint_files as files_mod
from seqpg.rundir.checkpoint import latest_checkpoint
from seqpg.config import load_config
from seqpg.training.trainer import train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# stage -> (function in seqpg.rundir.checkpoint or .checkpoint_files, which call of it while saving step 4 to die in)
_STAGES = {
    "weights": ("save_model", lambda *a: True),
    "optimizer": ("torch_save", lambda obj, path: Path(path).name == "optimizer.pt"),
    "rng": ("torch_save", lambda obj, path: Path(path).name == "rng.pt"),
    "trainer_state": ("write_text", lambda path, text: Path(path).name == "trainer_state.json"),
    "checksums": ("file_checksums", lambda *a: True),
    "meta": ("write_text", lambda path, text: Path(path).name == "meta.json"),
    "fsync": ("fsync_tree", lambda *a: True),
    "rename": ("move_into_place", lambda *a: True),
    "pointer": ("write_pointer", lambda *a: True),
    "prune": ("_discard", lambda *a: True),
}


def _die_in(stage: str) -> None:
    """In the child: SIGKILL on entering ``stage`` of the save of step ``STEPS``."""
    name, when = _STAGES[stage]
    saving = {"step": None}
    real_save = ckpt_mod.save_checkpoint

    def save_checkpoint(run_dir, step, **kw):
        saving["step"] = step
        return real_save(run_dir, step, **kw)

    def patched(real):
        def hook(*args, **kwargs):
            if saving["step"] == STEPS and when(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return hook

    ckpt_mod.save_checkpoint = save_checkpoint  # what every whole-model save calls
    if name == "torch_save":
        torch.save = patched(torch.save)
    else:  # where the save looks the name up: the whole-model writer, or the checkpoint-files helpers it calls
        for module in (ckpt_mod, files_mod):
            if hasattr(module, name):
                setattr(module, name, patched(getattr(module, name)))


@pytest.mark.parametrize("stage", list(_STAGES))
def test_kill9_in_each_checkpoint_stage_then_resume_equals_uninterrupted(stage, reference, prompt_file, tmp_path):
    run = tmp_path / "run"
    # keep_checkpoints=1: saving step 4 deletes step 2's checkpoint (the prune stage)
    cfg = load_config(None, overrides(prompt_file, run, "keep_checkpoints=1"))
    pid = os.fork()
    if pid == 0:  # the child trains and must never return into pytest
        try:
            _die_in(stage)
            train(cfg, progress=False)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 300
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked run neither finished nor was killed")
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"stage {stage} was never entered"

    found = latest_checkpoint(run)
    assert found.name in ("step-000002", "step-000004")
    resume(prompt_file, run, "keep_checkpoints=1")
    assert maths(run) == maths(reference)
    assert weights_sha(run) == weights_sha(reference)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
