"""One writer per run directory: an exclusive lock on ``RUN/.lock`` held for the whole run.

Two ``seqpg train`` processes on one run directory (or a ``--resume`` while the run is still
going) would duplicate metric lines, append to replaced log files and delete each other's
temporary checkpoint directories.  :class:`RunLock` refuses the second one with
:class:`RunInUse`, whose message names the holder (pid, host, start time).

On POSIX the lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when the process
ends in any way (``kill -9`` included), so a lock left by a dead process is never in the way.
Elsewhere ``RUN/.lock`` is created with ``O_EXCL``; a file left by a process that is no longer
alive on this host is recognised as stale and replaced.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``with RunLock(run_dir): ...`` holds ``run_dir``'s lock for the block (created if missing)."""

    def __init__(self, run_dir: str | os.PathLike, *, use_flock: bool | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.use_flock = fcntl is not None if use_flock is None else use_flock
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.use_flock:
            self._acquire_flock()
        else:
            self._acquire_exclusive()

    def release(self) -> None:
        if self._fd is None:
            return
        if self.use_flock:  # empty the holder record first: the file stays (unlinking it would race)
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
        else:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- POSIX: flock, released by the kernel with the process ------------------------------
    def _acquire_flock(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.path)
            os.close(fd)
            raise RunInUse(_in_use_message(self.run_dir, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, _holder_record().encode())
        os.fsync(fd)
        self._fd = fd

    # -- elsewhere: O_EXCL, stale when the holder's pid is gone ----------------------------
    def _acquire_exclusive(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if _is_stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunInUse(_in_use_message(self.run_dir, holder)) from None
            os.write(fd, _holder_record().encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise RunInUse(_in_use_message(self.run_dir, _read_holder(self.path)))


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunInUse` if a live process holds ``run_dir``'s lock (takes and drops it at once).

    Lets a command that would refuse the directory for another reason (a new run over an old one)
    say first that a run is writing there now."""
    if (Path(run_dir) / LOCK_FILE).is_file():
        with RunLock(run_dir):
            pass


def _holder_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_use_message(run_dir: Path, holder: dict[str, Any]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder.get("pid")
           else "another process")
    return f"{run_dir} is in use by {who}; wait for it or use another run_dir"


def _is_stale(holder: dict[str, Any]) -> bool:
    """A holder record of a process that is gone: same host, pid not alive (or no readable record)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if holder.get("host") != socket.gethostname():
        return False  # cannot tell from here: assume alive
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
