"""Rollouts: what the policy is run on to produce the tokens a step trains on.

Multi-turn episodes (issue 11): the model writes, an environment answers (a tool's result, a
game's feedback, a simulated user), the model writes again, rewards come per turn.  The state is
the prompt plus everything so far; the actions are only the tokens the model wrote, so

    U = sum over the model's tokens of log pi * A

and the environment's tokens are context, never actions.

Modules, one concern each:

* :mod:`.interface`    the rollout interface the step calls (sample, score, the reward a sample is
  reported with, its metrics) and its two implementations, ``Completions`` and ``Episodes``
* :mod:`.seeding`      the one seeder (generators and environments' reset seeds)
* :mod:`.sampling`     batched single-turn sampling with a KV cache -> ``RolloutBatch``
* :mod:`.fastdecode`   the lean one-token decode step of Llama-family models
* :mod:`.cpu_caps`     what the CPU and the torch build can do (the fast paths' fallbacks)
* :mod:`.environments` the Environment protocol (reset / step), ``StepResult``, the
  ``module:Class`` loader, turn and token limits
* :mod:`.env_adapters` the seqpg, gymnasium and TRL conventions behind one interface; an
  environment's public methods as stateful tools; in-process calls with a time limit
* :mod:`.env_errors`   ``episode.on_env_error``: one bad episode closed and counted, never the run
* :mod:`.skyrl_env`    SkyRL-Gym's environments (optional)
* :mod:`.tools`        tools from ``module:function``: JSON schemas, prompt rendering, the
  ``<tool_call>`` parser and a time-limited runner that never hangs
* :mod:`.chat`         chat-template rendering of new messages as a token delta (the kept
  tokens are never re-tokenised)
* :mod:`.episodes`     the ``Episode`` container and its layout as a ``RolloutBatch``
* :mod:`.multiturn`    the batched multi-turn sampler (episodes advance together, turn by turn,
  each turn extending the KV cache)
"""
