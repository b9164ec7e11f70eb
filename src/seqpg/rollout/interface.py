"""The rollout stage: one interface, two implementations, chosen once.

    Rollouts      sample -> RolloutBatch;  score -> ScoredBatch;  the reward a sample is reported with;
                  its metrics and log rows
    Completions   single-turn: one completion per sample (:func:`seqpg.rollout.sampling.generate`)
    Episodes      multi-turn: the model and an environment (or tools) take turns
                  (:func:`seqpg.rollout.multiturn.sample_episodes`)

:func:`rollouts_from_config` picks one from the configuration (the ``episode`` section on or off); the
training step's settings hold it (:class:`seqpg.training.step.StepSettings`), and the trainer,
evaluation, ``seqpg explain``, the lab and the benchmark call it without asking which it is.

An episode batch IS a :class:`~seqpg.batch.RolloutBatch`, so every estimator, loss, KL term, entropy
bonus and critic of the step runs on it unchanged (:mod:`seqpg.rollout.episodes` has the layout): the
completion holds the model's turns AND the environment's tokens, the action mask only the model's.
Its optional fields carry what only episodes have: the environment's per-turn rewards
(``env_rewards_BC``), which turn each token belongs to (``turn_BC``) and the episodes themselves
(turns, tool results, the environment each was played in). The environment's rewards are dense token
rewards on the last token of each model turn (weighted by ``episode.env_weight``); the scorers score
the final model turn's text as the completion.

Seeds: every prompt of a call has a reset seed (:func:`seqpg.rollout.seeding.reset_seeds`); its
environments are reset with it, so a resumed run, or one split over processes, resets every
environment as the uninterrupted single-process run did. Completions ignore it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch

from ..batch import Prompt, RolloutBatch, ScoredBatch, sequence_returns
from ..model.policy import model_device
from ..rewards.scorers import score_batch
from .env_adapters import merge_tools, method_tools
from .env_errors import check_not_all_failed
from .environments import ENV_SCORE, EpisodeLimits, QuestionEnv, load_environment, make_environment
from .episodes import episodes_to_rollout
from .multiturn import sample_episodes
from .prefix import PrefillCount
from .sampling import SamplingArgs, SampleSettings
from .tools import ERROR_KINDS, Tool, ToolLimits, load_tools


class Rollouts(ABC):
    """How a run samples and scores: :class:`Completions` or :class:`Episodes` (module docstring)."""

    sampling: SampleSettings
    shared_openings: bool
    """Whether the collapse watch compares the samples' openings (a completion's first words; an episode's
    first turn is the environment's question, not the model's)."""

    @property
    @abstractmethod
    def max_completion_tokens(self) -> int:
        """The most completion columns a row can have (the Dr. GRPO loss's constant normaliser)."""

    def at_model_precision(self) -> "Rollouts":
        """These rollouts with the sampler in the model's own precision (``sampling.dtype`` null): what an
        evaluation measures, the policy as trained and exported, not its lower-precision sampler."""
        return replace(self, sampling=replace(self.sampling, dtype=None))

    @abstractmethod
    def sample(self, model, tokenizer, prompts: list[Prompt], *, n: int, seeds: Sequence[int],
               generator: torch.Generator | None = None, greedy: bool = False) -> RolloutBatch:
        """``n`` samples of each prompt, rows grouped by prompt; prompt i's environments reset with
        ``seeds[i]``; ``generator`` None: the global RNG; ``greedy``: argmax (log-probs at the temperature)."""

    @abstractmethod
    def score(self, rollout: RolloutBatch, scorers, *, on_error: str, tokenizer) -> ScoredBatch:
        """The scorers' verdict (and for episodes the environment's rewards) on ``rollout``."""

    @abstractmethod
    def reported_rewards(self, scored: ScoredBatch) -> torch.Tensor:
        """(B,) the reward a sample is logged, evaluated, explained and baselined (ReMax) with."""

    def check_batch(self, rollout: RolloutBatch) -> None:
        """Refuse a sampled batch that cannot be trained on (episodes: every one failed); nothing for completions."""

    def metrics(self, rollout: RolloutBatch, gather_cat: Callable, all_reduce_sum: Callable) -> dict[str, float]:
        """What a step logs about how its samples were drawn, over all processes: the prompt tokens its
        prefill ran through the model, and those its rows hold beyond them (shared prefixes and identical
        prompts computed once: :mod:`.prefix`), where the sampler counted them."""
        if rollout.prefill_tokens is None:
            return {}
        done, held = all_reduce_sum(torch.tensor([float(rollout.prefill_tokens),
                                                  float(rollout.prompt_mask_BP.sum())])).tolist()
        return {"sampling/prefill_tokens": done, "sampling/prefill_shared_tokens": held - done}

    def log_row(self, rollout: RolloutBatch, i: int) -> dict[str, Any]:
        """What a logged sample row holds besides prompt, completion, reward and scores (none for completions)."""
        return {}

    def transcript(self, rollout: RolloutBatch, tokenizer, i: int) -> str:
        """Row ``i``'s completion as ``seqpg explain`` shows it."""
        return rollout.completions[i]

    def with_completion(self, rollout: RolloutBatch, tokenizer, completion: str) -> RolloutBatch:
        """``rollout`` (one prompt's samples) with row 0 replaced by ``completion`` (``seqpg explain --completion``)."""
        raise ValueError(f"--completion cannot be given for {self.describe()}; leave it out to explain a sample")

    def describe(self) -> str:
        return type(self).__name__

    def check_template(self, tokenizer) -> None:
        """Refuse (a ``ConfigError``) a chat template the samples cannot be rendered with (nothing for completions)."""

    def check_context(self, n_ctx: int) -> None:
        """Refuse (a ``ConfigError``) a budget that a model of ``n_ctx`` positions cannot hold (a completion's
        prompt and budget are fitted prompt by prompt: ``task.overlong_prompts``)."""

    def group_seeds(self, rollout: RolloutBatch) -> list[int]:
        """Each group's reset seed, in group order (what a greedy sample of the same prompts is reset with)."""
        return [0] * len(set(rollout.group_ids_B.tolist()))

    def greedy_baseline(self, model, tokenizer, rollout: RolloutBatch, prompts: list[Prompt], scorers) -> torch.Tensor:
        """(B,) ReMax's baseline: the reported reward of one greedy sample of each row's prompt (``prompts``:
        the rollout's distinct prompts in group order), reset as that prompt's samples were."""
        greedy = self.sample(model, tokenizer, prompts, n=1, seeds=self.group_seeds(rollout), greedy=True)
        return self.reported_rewards(self.score(greedy, scorers, on_error="zero", tokenizer=tokenizer))[
            rollout.group_ids_B]


@dataclass(frozen=True)
class Completions(Rollouts):
    """Single-turn: each sample is one completion of its prompt."""

    sampling: SampleSettings
    shared_openings = True

    @property
    def max_completion_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def sample(self, model, tokenizer, prompts, *, n, seeds, generator=None, greedy=False) -> RolloutBatch:
        return self.sampling.generate(model, tokenizer, prompts, n=n, greedy=greedy, generator=generator)

    def score(self, rollout, scorers, *, on_error, tokenizer) -> ScoredBatch:
        return score_batch(rollout, scorers, on_error=on_error, tokenizer=tokenizer)

    def reported_rewards(self, scored: ScoredBatch) -> torch.Tensor:
        return scored.rewards_B

    def with_completion(self, rollout: RolloutBatch, tokenizer, completion: str) -> RolloutBatch:
        ids = list(tokenizer(completion, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]
        C = max(len(ids), rollout.completion_ids_BC.shape[1])
        B, c0 = rollout.batch_size, rollout.completion_ids_BC.shape[1]
        comp = torch.full((B, C), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, C), dtype=torch.bool)
        lp = torch.zeros((B, C))
        comp[:, :c0], mask[:, :c0], lp[:, :c0] = (rollout.completion_ids_BC, rollout.completion_mask_BC,
                                                  rollout.sample_logprobs_BC)
        comp[0], mask[0], lp[0] = tokenizer.pad_token_id, False, 0.0
        comp[0, :len(ids)] = torch.tensor(ids)
        mask[0, :len(ids)] = True
        finished = rollout.finished_B.clone()
        finished[0] = True
        return RolloutBatch(rollout.prompts, [completion] + rollout.completions[1:], rollout.prompt_ids_BP,
                            rollout.prompt_mask_BP, comp, mask, lp, rollout.group_ids_B, finished)

    def describe(self) -> str:
        return "single-turn completions"


@dataclass(frozen=True)
class Episodes(Rollouts):
    """Multi-turn: each sample is an episode of the model and an environment (the ``episode`` section)."""

    sampling: SampleSettings
    env_cls: type
    env_spec: str
    env_params: Mapping[str, Any]
    env_weight: float
    tools: Mapping[str, Tool]
    limits: EpisodeLimits
    tool_limits: ToolLimits
    env_timeout_s: float
    """Seconds each call into the environment may take (``episode.env_timeout_s``)."""
    on_env_error: str
    """``drop`` or ``raise`` (``episode.on_env_error``, :mod:`seqpg.rollout.env_errors`)."""
    shared_openings = False

    @property
    def max_completion_tokens(self) -> int:
        return self.limits.max_tokens

    def check_context(self, n_ctx: int) -> None:
        from ..config import ConfigError

        if self.limits.max_tokens > n_ctx:
            raise ConfigError(f"episode.max_episode_tokens={self.limits.max_tokens} exceeds the model's context "
                              f"of {n_ctx} positions; lower it")

    def check_template(self, tokenizer) -> None:
        """The template probe (:func:`seqpg.rollout.chat.probe_chat_template`; a tool turn when the run has tools)."""
        from ..config import ConfigError
        from .chat import probe_chat_template
        from .sampling import uses_chat_template

        if not uses_chat_template(tokenizer, self.sampling.chat_template):
            return
        try:
            probe_chat_template(tokenizer, tool_turn=bool(self.tools))
        except ValueError as err:
            raise ConfigError(f"sampling.chat_template: {err}") from err

    def make_env(self):
        return make_environment(self.env_cls, dict(self.env_params), spec=self.env_spec)

    def sample(self, model, tokenizer, prompts, *, n, seeds, generator=None, greedy=False) -> RolloutBatch:
        s = self.sampling
        args = SamplingArgs(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, greedy=greedy)
        prefill = PrefillCount()
        with s.precision(model_device(model).type):  # the sampler's precision, as single-turn sampling's
            episodes = sample_episodes(model, tokenizer, prompts, self.make_env, n=n, limits=self.limits,
                                       sampling=args, tools=dict(self.tools), tool_limits=self.tool_limits,
                                       stop_strings=s.stop_strings, system_prompt=s.system_prompt,
                                       chat_template=s.chat_template, env_seeds=list(seeds), generator=generator,
                                       env_name=self.env_spec, fast_decode=s.fast_decode,
                                       env_timeout_s=self.env_timeout_s, on_env_error=self.on_env_error,
                                       quantize=s.quantize, prefill=prefill)
        return episodes_to_rollout(episodes, tokenizer.pad_token_id, n=n, prefill_tokens=prefill.tokens)

    def check_batch(self, rollout: RolloutBatch) -> None:
        """One bad episode never stops a run; a step where every episode failed does (one line)."""
        check_not_all_failed(rollout.episodes, self.env_spec)

    def score(self, rollout, scorers, *, on_error, tokenizer) -> ScoredBatch:
        """The scorers on each episode's final model turn, plus the environment's per-turn rewards
        (``env_weight`` x, dense, on each turn's last token); ``scores["env"]`` is each episode's
        environment return (unweighted)."""
        B = rollout.batch_size
        if scorers:
            scored = score_batch(rollout, scorers, on_error=on_error, tokenizer=tokenizer)
        else:
            scored = ScoredBatch(rollout=rollout, rewards_B=torch.zeros(B), scores={})
        dense_BC = self.env_weight * rollout.env_rewards_BC
        scored.token_rewards_BC = dense_BC if scored.token_rewards_BC is None else scored.token_rewards_BC + dense_BC
        scored.scores[ENV_SCORE] = rollout.env_rewards_BC.sum(dim=1)
        scored.rollout = rollout
        return scored

    def reported_rewards(self, scored: ScoredBatch) -> torch.Tensor:
        """An episode's whole return (:func:`seqpg.batch.sequence_returns`)."""
        return sequence_returns(scored)

    def metrics(self, rollout, gather_cat, all_reduce_sum) -> dict[str, float]:
        """Turns, how episodes ended, the context's share of the span, tool calls and their errors by kind; the
        prefill's tokens."""
        eps = rollout.episodes
        turns_B = torch.tensor([float(len(ep.turns)) for ep in eps])
        done_B = torch.tensor([float(ep.done) for ep in eps])
        results = [res for ep in eps for t in ep.turns for res in t.tool_results]
        errors = Counter(res.error for res in results if res.error is not None)
        actions, span = rollout.completion_lengths_B.sum().float(), rollout.span_lengths_B.sum().float()
        sums = all_reduce_sum(torch.stack([actions, span, torch.tensor(float(len(results)))]))
        m = {"episode/turns": float(gather_cat(turns_B).mean()), "episode/done_frac": float(gather_cat(done_B).mean()),
             "episode/context_frac": 1.0 - float(sums[0] / sums[1].clamp(min=1)), "episode/tool_calls": float(sums[2])}
        counts = all_reduce_sum(torch.tensor([float(errors.get(k, 0)) for k in ERROR_KINDS]))
        m.update({f"episode/tool_errors/{k}": float(v) for k, v in zip(ERROR_KINDS, counts.tolist())})
        m["episode/env_errors"] = float(all_reduce_sum(torch.tensor(float(sum(ep.env_error is not None
                                                                              for ep in eps)))))
        return {**m, **super().metrics(rollout, gather_cat, all_reduce_sum)}

    def log_row(self, rollout, i) -> dict[str, Any]:
        """Every model turn, what answered it, and the environment's reward for it."""
        return {"turns": [{"text": t.text, "reward": t.reward, "tools": [res.content for res in t.tool_results]}
                          for t in rollout.episodes[i].turns],
                "env_error": rollout.episodes[i].env_error}  # why the environment failed (on_env_error: drop)

    def transcript(self, rollout, tokenizer, i) -> str:
        """The whole episode after the prompt, the environment's tokens included."""
        return tokenizer.decode(rollout.completion_ids_BC[i, :int(rollout.span_lengths_B[i])].tolist())

    def describe(self) -> str:
        return ("a multi-turn run (episode.env / episode.tools): the environment answers each turn")

    def group_seeds(self, rollout) -> list[int]:
        ids = rollout.group_ids_B.tolist()
        return [rollout.episodes[ids.index(g)].seed for g in sorted(set(ids))]


def rollouts_from_config(cfg) -> Rollouts:
    """The run's rollouts from a :class:`~seqpg.config.TrainConfig`: :class:`Episodes` when the ``episode``
    section is on, else :class:`Completions`.  The environment class and the tools are loaded here, once
    (a bad one is a :class:`~seqpg.config.ConfigError`, before any model loads)."""
    from ..config import ConfigError

    sampling = SampleSettings.from_config(cfg.sampling)
    e = cfg.episode
    if not e.enabled:
        return Completions(sampling)
    spec = e.env or "tools-only (QuestionEnv)"
    try:
        env_cls = load_environment(e.env) if e.env is not None else QuestionEnv
        env = make_environment(env_cls, dict(e.env_params), spec=spec)  # a constructor that refuses its params, now
        tools = merge_tools(load_tools(list(e.tools)), method_tools(env, spec=spec))  # its public methods are tools
    except (ValueError, TypeError, AttributeError, ImportError, OSError, SyntaxError) as err:
        raise ConfigError(f"episode: {err}") from err
    limits = EpisodeLimits(max_turns=e.max_turns, max_new_tokens=cfg.sampling.max_new_tokens,
                           max_tokens=e.max_episode_tokens)
    return Episodes(sampling, env_cls=env_cls, env_spec=spec, env_params=MappingProxyType(dict(e.env_params)),
                    env_weight=e.env_weight, tools=MappingProxyType(tools), limits=limits,
                    tool_limits=ToolLimits(timeout_s=e.tool_timeout_s, max_chars=e.tool_max_chars,
                                           max_calls=e.tool_max_calls, max_parallel=e.tool_max_parallel,
                                           memory_mb=e.tool_memory_mb, cpu_s=e.tool_cpu_s, file_mb=e.tool_file_mb,
                                           max_processes=e.tool_max_processes),
                    env_timeout_s=e.env_timeout_s, on_env_error=e.on_env_error)
