"""Errors that are not a crash of the process: a scorer raising mid-run, an update raising, a full disk."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
from fault_rewards import ARMED
from faultkit import maths, overrides, resume, weights_sha

import seqpg.rundir.checkpoint as checkpoint_mod
import seqpg.training.trainer as trainer_mod
from seqpg.rundir.checkpoint import latest_checkpoint
from seqpg.config import load_config
from seqpg.rewards.scorers import ScorerError
from seqpg.training.trainer import train

_SAMPLES_PER_STEP = 16  # sampling.prompts_per_step=4 x samples_per_prompt=4


def test_scorer_raising_mid_run_saves_the_last_good_step_and_writes_plots(reference, prompt_file, tmp_path, capsys):
    run = tmp_path / "run"
    ARMED["calls_left"] = 2 * _SAMPLES_PER_STEP + 5  # steps 1-2 score, step 3 raises; nothing saved on schedule
    with pytest.raises(ScorerError, match="simulated scorer failure"):
        train(load_config(None, overrides(prompt_file, run, "save_every=1000")), progress=False)
    assert "seqpg: step 3 failed; saved the checkpoint of step 2, the last complete step" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step-000002"
    assert sorted(p.name for p in (run / "plots").glob("*.png"))  # plots written on the way out
    assert [r["step"] for r in maths(run)] == [1, 2]
    # The saved state is the end of step 2 exactly (prompt stream and RNG streams rewound):
    # resuming with a scorer that works ends exactly like the uninterrupted run.
    ARMED["calls_left"] = None
    resume(prompt_file, run)
    assert maths(run) == maths(reference)
    assert weights_sha(run) == weights_sha(reference)


def test_an_update_that_raises_saves_nothing_and_says_why(prompt_file, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real, calls = trainer_mod.update, []

    def update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure inside the update")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "update", update)
    with pytest.raises(RuntimeError, match="inside the update"):
        train(load_config(None, overrides(prompt_file, run, "save_every=1000")), progress=False)
    err = capsys.readouterr().err
    assert "step 3 failed; no checkpoint saved: it failed during the update" in err
    assert latest_checkpoint(run) is None  # a half-updated model is never saved
    assert list((run / "plots").glob("*.png"))


def test_a_failure_in_the_first_step_has_nothing_to_save(prompt_file, tmp_path, capsys):
    run = tmp_path / "run"
    ARMED["calls_left"] = 3
    with pytest.raises(ScorerError):
        train(load_config(None, overrides(prompt_file, run)), progress=False)
    assert "step 1 failed; no checkpoint saved: no step has completed since the last checkpoint" in capsys.readouterr().err
    assert latest_checkpoint(run) is None


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("disk full needs a small file system: mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"disk full needs a small file system, and mounting a tmpfs failed here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_the_previous_checkpoint_and_resumes_exactly(reference, prompt_file, small_fs, tmp_path):
    run = small_fs / "run"
    filler = small_fs / "filler"
    real_save = checkpoint_mod.save_checkpoint

    def fill_then_save(run_dir, step, **kw):  # the disk fills up between the checkpoints of steps 2 and 4
        if step == 4:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        return real_save(run_dir, step, **kw)

    checkpoint_mod.save_checkpoint = fill_then_save  # what every whole-model save calls
    try:
        # safetensors reports it as its own SafetensorError, with the OS's message
        with pytest.raises(Exception, match="No space left on device"):
            train(load_config(None, overrides(prompt_file, run)), progress=False)
    finally:
        checkpoint_mod.save_checkpoint = real_save
    assert latest_checkpoint(run).name == "step-000002"  # intact: verified by latest_checkpoint
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []
    filler.unlink()  # space again: resume
    resume(prompt_file, run)
    assert maths(run) == maths(reference)
    assert weights_sha(run) == weights_sha(reference)
