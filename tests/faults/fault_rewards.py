"""A reward for the fault tests that can be armed to raise after a number of calls (a scorer failing mid-run)."""

ARMED: dict[str, int | None] = {"calls_left": None}


def fragile(prompt: str, completion: str, meta: dict) -> float:
    """Fraction of the completion's characters that are `a`; raises once ``ARMED["calls_left"]`` calls are used up."""
    left = ARMED["calls_left"]
    if left is not None:
        if left <= 0:
            raise RuntimeError("simulated scorer failure")
        ARMED["calls_left"] = left - 1
    return completion.count("a") / max(len(completion), 1) if completion else 0.0
