"""Environments that fail in one way each, on the prompts named in ``fail_on`` (``"*"``: every prompt)."""

from __future__ import annotations

import time


class Flaky:
    """Two turns; ``mode`` says how it fails on the chosen prompts: reset_raises, step_raises, nan, bool, str,
    bad_shape, hang (past episode.env_timeout_s), huge_obs (a first observation over the token budget)."""

    def __init__(self, mode: str = "step_raises", fail_on: str = "cat,sun"):
        self.mode, self.fail_on = mode, fail_on.split(",")

    def reset(self, prompt, seed):
        self.k, self.bad = 0, self.fail_on == ["*"] or prompt.text in self.fail_on
        if self.bad and self.mode == "reset_raises":
            raise RuntimeError("the environment's server is down")
        if self.bad and self.mode == "huge_obs":
            return "x" * 5000
        return f"say {prompt.text}"

    def step(self, model_text):
        self.k += 1
        if self.bad and self.k == 2:
            if self.mode == "step_raises":
                raise ValueError("step failed on turn 2")
            if self.mode == "hang":
                time.sleep(3)
            if self.mode in ("nan", "bool", "str"):
                return "more", {"nan": float("nan"), "bool": True, "str": "1.0"}[self.mode], False, {}
            if self.mode == "bad_shape":
                return "more"
        return "more", 0.5, self.k >= 3, {}
