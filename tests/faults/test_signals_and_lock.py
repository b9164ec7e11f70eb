"""A real `seqpg train` process: a second writer is refused, SIGUSR1 checkpoints and goes on, SIGTERM
finishes the step, saves and exits with status 3 (resumable)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from faultkit import maths, overrides, subprocess_env

from seqpg.rundir.checkpoint import latest_checkpoint, verify_checkpoint
from seqpg.apps.cli import main
from seqpg.rundir.signals import EXIT_STOPPED

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


def _wait(predicate, what: str, proc: subprocess.Popen, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.fixture(scope="module")
def running(prompt_file, tmp_path_factory):
    """A long `seqpg train` (1000 steps, no scheduled checkpoint) that has logged a step."""
    run = tmp_path_factory.mktemp("signals") / "run"
    args = overrides(prompt_file, run, "steps=1000", "save_every=1000")
    proc = subprocess.Popen([sys.executable, "-m", "seqpg", "train", "--no-progress", *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _lines(run) >= 1, "the first step", proc)
        yield proc, run, args
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_second_writer_and_a_resume_while_running_are_refused(running, capsys):
    proc, run, args = running
    assert main(["train", "--no-progress", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith(f"seqpg: {run} is in use by pid {proc.pid} on ") and "wait for it or use another run_dir" in err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 1
    assert f"in use by pid {proc.pid}" in capsys.readouterr().err
    assert proc.poll() is None  # the first run goes on undisturbed


def test_sigusr1_saves_a_checkpoint_and_the_run_goes_on(running):
    proc, run, _ = running
    assert latest_checkpoint(run) is None
    proc.send_signal(signal.SIGUSR1)
    ckpt = _wait(lambda: latest_checkpoint(run), "the SIGUSR1 checkpoint", proc)
    n = _lines(run)
    _wait(lambda: _lines(run) > n, "a step after the checkpoint", proc)
    verify_checkpoint(ckpt)


def test_sigterm_finishes_the_step_saves_and_exits_3(running):
    proc, run, _ = running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    assert "SIGTERM: finishing the current step" in err
    last = maths(run)[-1]["step"]
    ckpt = latest_checkpoint(run)
    assert ckpt.name == f"step-{last:06d}"  # no completed step lost
    verify_checkpoint(ckpt)
    assert not (run / ".lock").read_text()  # the holder record is cleared on exit
    assert os.path.getsize(run / "metrics.jsonl") > 0
