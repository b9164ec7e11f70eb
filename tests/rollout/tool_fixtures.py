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
