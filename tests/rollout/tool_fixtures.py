"""Tools for the runner tests (a module, so they load as ``tool_fixtures:name``)."""

import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def sleep_forever(x: int) -> str:
    """Never returns.

    Args:
        x: ignored
    """
    while True:
        time.sleep(0.05)


def explode(x: int) -> str:
    """Always raises.

    Args:
        x: ignored
    """
    raise ValueError(f"bad x {x}")


def huge(x: int) -> str:
    """A 10 MB string.

    Args:
        x: ignored
    """
    return "y" * 10_000_000


class Unprintable:
    def __str__(self):
        raise RuntimeError("no")


def unprintable(x: int) -> str:
    """An object whose str() raises.

    Args:
        x: ignored
    """
    return Unprintable()


def undocumented(x):
    return x


NOT_A_FUNCTION = 3


def start_sleep(seconds: int) -> int:
    """Start a `sleep` process and return its pid, leaving it running.

    Args:
        seconds: how long it sleeps
    """
    import subprocess

    return subprocess.Popen(["sleep", str(seconds)]).pid


def start_sleep_and_hang(seconds: int) -> str:
    """Start a `sleep` process, write its pid to stdout, then never return.

    Args:
        seconds: how long it sleeps
    """
    import subprocess

    print(subprocess.Popen(["sleep", str(seconds)]).pid, flush=True)
    while True:
        time.sleep(0.05)


def leave_a_daemon(seconds: int) -> int:
    """Fork a process that leaves the call's process group (as a daemon would), keeping every inherited
    descriptor, and sleeps; return its pid.

    Args:
        seconds: how long it sleeps
    """
    import os

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.write(ready_w, b"x")
        time.sleep(seconds)
        os._exit(0)
    os.read(ready_r, 1)  # it has left the group
    return pid


def survive_sigterm(x: int) -> str:
    """Send itself SIGTERM, then report having survived it.

    Args:
        x: ignored
    """
    import os
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    return "survived"


def chatty(x: int) -> str:
    """Print to stdout and stderr, through Python and straight to the descriptors.

    Args:
        x: how many characters of filler to print
    """
    import os
    import sys

    print("to stdout")
    print("to stderr", file=sys.stderr)
    os.write(1, b"raw fd 1\n")
    print("z" * x)
    return "done"


def allocate(mb: int) -> str:
    """Allocate and touch `mb` megabytes.

    Args:
        mb: megabytes
    """
    block = bytearray(mb * 2**20)
    return f"allocated {len(block)}"


def spin(x: int) -> str:
    """Burn CPU forever.

    Args:
        x: ignored
    """
    while True:
        x += 1


def write_file(path: str, mb: int) -> str:
    """Write `mb` megabytes to `path`.

    Args:
        path: the file
        mb: megabytes
    """
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(b"w" * 2**20)
    return "written"


def rlimits(x: int) -> str:
    """The process's soft resource limits as JSON.

    Args:
        x: ignored
    """
    import json
    import resource

    return json.dumps({name: resource.getrlimit(getattr(resource, name))[0]
                       for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC")})


def who(x: int) -> str:
    """This process's pid, process group and session as JSON.

    Args:
        x: ignored
    """
    import json
    import os

    return json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0)})


def nap(seconds: float) -> str:
    """Sleep, then return when it started and ended (time.monotonic) as JSON.

    Args:
        seconds: how long
    """
    import json

    t0 = time.monotonic()
    time.sleep(seconds)
    return json.dumps([t0, time.monotonic()])
