"""The run directory's lock: refused while held, free after the holder dies (kill -9), and the
O_EXCL fallback (platforms without fcntl) recognises a stale lock of a dead process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from seqpg.rundir.runlock import LOCK_FILE, RunInUse, RunLock

_HOLD = "import sys, time; from seqpg.rundir.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_lock_is_refused_while_held_and_free_after_kill9(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(__import__("seqpg").__path__[0].rsplit(os.sep, 1)[0]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(RunInUse, match=f"in use by pid {proc.pid} on {socket.gethostname()} since "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # stale record left by kill -9
    with RunLock(tmp_path):  # ... recognised: the kernel released the lock with the process
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("use_flock", [True, False])
def test_one_holder_at_a_time_in_one_process_too(tmp_path, use_flock):
    with RunLock(tmp_path, use_flock=use_flock):
        with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
            RunLock(tmp_path, use_flock=use_flock).acquire()
    with RunLock(tmp_path, use_flock=use_flock):  # released on exit
        pass


def test_exclusive_file_fallback_replaces_the_lock_of_a_dead_process(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with RunLock(tmp_path, use_flock=False):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(json.dumps(dict(record, host="elsewhere")))  # cannot tell: refused
    with pytest.raises(RunInUse, match="on elsewhere since earlier"):
        RunLock(tmp_path, use_flock=False).acquire()
