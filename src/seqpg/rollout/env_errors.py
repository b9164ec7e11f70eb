"""One bad episode never stops a run: what happens when an environment or the chat template fails.

``episode.on_env_error`` decides, for a failure in ONE episode: an environment whose ``reset``,
``step``, ``tool_step``, ``get_reward`` or method tool raises, runs past ``episode.env_timeout_s`` or
returns something unusable (a wrong shape; a reward that is a bool, a string or not finite), a chat
template that rejects the conversation or rewrites text already in the context, a first observation
over the episode's token budget.

* ``raise``: the run stops with :class:`EpisodeFailure`, one line naming the environment, the prompt
  and the turn.
* ``drop`` (the default): the episode is closed as truncated and counted (``Episode.env_error``,
  ``episode/env_errors``).  The failing turn gets no reward (its earlier turns keep theirs).  A failure
  before the first turn (``reset``, the first render, the budget) starts the episode from the task's
  prompt as a plain user message instead; the model writes one turn, which gets no reward.

Why closed and kept in its group rather than removed from it: every group keeps its size, so every
estimator (group baselines, leave-one-out, whitening) runs unchanged, and the tokens the model did write
are still a sample of the policy; the cost is that the failed episode's reward is its earlier turns'
rewards (0 for a start failure) plus the scorers', which the group baseline then compares against.
An environment that fails on most episodes therefore biases training, which is why every failure is
counted and the first of each kind is printed.  A step where every episode failed stops the run
(:func:`check_not_all_failed`): there is nothing to learn from, and the cause is not one bad episode.
"""

from __future__ import annotations

import sys

from .episodes import Episode

ON_ENV_ERROR = ("drop", "raise")
"""The values of ``episode.on_env_error``."""

_reported: set[tuple[str, str, str]] = set()


class EpisodeFailure(RuntimeError):
    """An environment or the chat template failed and ``episode.on_env_error`` is ``raise``; or every
    episode of a step failed."""


def fail_episode(episode: Episode, env_name: str, where: str, error: BaseException, on_env_error: str) -> None:
    """Record ``error`` (raised at ``where``: "reset" or "turn k") in ``episode``: closed as truncated
    (``drop``), or raised as one :class:`EpisodeFailure` line (``raise``).  The first failure of each kind
    (environment, phase, exception type) is printed once per process."""
    text = " ".join(str(error).split()) or type(error).__name__
    line = (f"environment {env_name} failed at {where} of an episode of prompt {episode.prompt.id!r}: "
            f"{type(error).__name__}: {text}")
    if on_env_error == "raise":
        raise EpisodeFailure(f"{line}; fix the environment, or set episode.on_env_error=drop to close such "
                             "episodes as truncated (counted in episode/env_errors)") from error
    episode.env_error = f"{where}: {type(error).__name__}: {text}"
    episode.truncated, episode.done = True, False
    key = (env_name, where.split()[0], type(error).__name__)
    if key not in _reported:
        _reported.add(key)
        print(f"seqpg: {line}; the episode is closed as truncated (episode.on_env_error=drop); further failures "
              "like it are counted in episode/env_errors, not printed", file=sys.stderr)


def check_not_all_failed(episodes: list[Episode], env_name: str) -> None:
    """Raise one :class:`EpisodeFailure` line when every episode of ``episodes`` failed."""
    if episodes and all(ep.env_error is not None for ep in episodes):
        raise EpisodeFailure(f"every one of the step's {len(episodes)} episodes failed (environment {env_name}; "
                             f"the first: {episodes[0].env_error}); nothing to train on")
