"""Multi-turn episodes as a training batch: the sample and score stages of a run with ``episode.env`` /
``episode.tools``.

An episode batch IS a :class:`~seqpg.batch.RolloutBatch`, so every estimator, loss, KL term, entropy bonus
and critic of the step runs on it unchanged:

    prompt_ids_BP        the first observation (the rendered initial prompt), left-padded
    completion_ids_BC    everything after it, in order: model turns AND environment tokens, exactly the ids
                         sampled or appended (never decoded and re-tokenised), right-padded
    completion_mask_BC   the ACTION mask: True only on the tokens the model wrote (each turn's EOS included)
    sample_logprobs_BC   the sampler's log-probs at the actions, 0 elsewhere
    group_ids_B          episodes of the same initial prompt share an id (their environments are reset with
                         the same seed, so they start from the same state)

The environment's tokens are context: the layouts feed every column up to the last action
(``RolloutBatch.span_mask_BC``) and every masked reduction skips them, so they are never in U, the KL
term, the entropy bonus or the critic's targets.  The environment's per-turn rewards are dense token
rewards on the last token of each model turn (``ScoredBatch.token_rewards_BC``, weighted by
``episode.env_weight``), and the scorers score the final model turn's text as the completion; returns
and GAE then step from one model token to the next across the environment's tokens (``gamma`` and
``lam`` count model tokens).

Environment seeds come from (run seed, step, the prompt's index in the step's global batch), so a resumed
run, or a run split over processes, resets every environment as the uninterrupted single-process run did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from ..batch import Prompt, RolloutBatch, ScoredBatch, sequence_returns
from .environments import ENV_SCORE, EpisodeLimits, load_environment, make_environment
from .episodes import Episode
from .multiturn import sample_episodes
from .sampling import SamplingArgs, SampleSettings, left_pad
from .env_adapters import merge_tools, method_tools
from .env_errors import check_not_all_failed
from .tools import Tool, ToolLimits, ToolStats, load_tools



class QuestionEnv:
    """The environment of a tools-only run (``episode.tools`` without ``episode.env``): the task's prompt is
    the question; the first model turn without a tool call is the answer and ends the episode (reward 0:
    the scorers judge the answer)."""

    def reset(self, prompt: Prompt, seed: int) -> str:
        return prompt.text

    def step(self, model_text: str):
        return None, 0.0, True, {}


@dataclass
class EpisodeRollout(RolloutBatch):
    """A :class:`RolloutBatch` of episodes, with what only episodes have (see the module docstring)."""

    env_rewards_BC: torch.Tensor = None  # (B, C) float32, each turn's environment reward on its last token
    turn_BC: torch.Tensor = None  # (B, C) long, k on model turn k's tokens, -1 on context and padding
    episodes: list[Episode] = field(default_factory=list)
    tool_calls: int = 0  # tool calls run while sampling this batch
    tool_errors: dict[str, int] = field(default_factory=dict)  # error kind -> count


@dataclass(frozen=True)
class EpisodeSettings:
    """The ``episode`` section resolved once: the environment class, the tools, the limits."""

    env_cls: type
    env_spec: str
    env_params: Mapping[str, Any]
    env_weight: float
    tools: Mapping[str, Tool]
    limits: EpisodeLimits
    tool_limits: ToolLimits
    env_timeout_s: float = 30.0
    on_env_error: str = "drop"

    @classmethod
    def from_config(cls, cfg) -> "EpisodeSettings | None":
        """From a :class:`~seqpg.config.TrainConfig`; None when the run is single-turn."""
        e = cfg.episode
        if not e.enabled:
            return None
        env_cls = load_environment(e.env) if e.env is not None else QuestionEnv
        spec = e.env or "tools-only (QuestionEnv)"
        make_environment(env_cls, dict(e.env_params), spec=spec)  # a constructor that refuses its params, now
        tools = merge_tools(load_tools(list(e.tools)), method_tools(make_environment(env_cls, dict(e.env_params),
                                                                                    spec=spec), spec=spec))
        limits = EpisodeLimits(max_turns=e.max_turns, max_new_tokens=cfg.sampling.max_new_tokens,
                               max_tokens=e.max_episode_tokens)
        return cls(env_cls=env_cls, env_spec=spec, env_params=MappingProxyType(dict(e.env_params)),
                   env_weight=e.env_weight, tools=MappingProxyType(tools), limits=limits,
                   tool_limits=ToolLimits(timeout_s=e.tool_timeout_s, max_chars=e.tool_max_chars,
                                          max_calls=e.tool_max_calls, max_parallel=e.tool_max_parallel,
                                          memory_mb=e.tool_memory_mb, cpu_s=e.tool_cpu_s, file_mb=e.tool_file_mb,
                                          max_processes=e.tool_max_processes),
                   env_timeout_s=e.env_timeout_s, on_env_error=e.on_env_error)

    def make_env(self):
        return make_environment(self.env_cls, dict(self.env_params), spec=self.env_spec)

    def sample(self, model, tokenizer, prompts: list[Prompt], sample: SampleSettings, *, n: int,
               env_seeds: list[int], generator: torch.Generator | None = None,
               greedy: bool = False) -> EpisodeRollout:
        """``n`` episodes of each prompt (prompt i's environments reset with ``env_seeds[i]``), batched."""
        stats = ToolStats()
        args = SamplingArgs(temperature=sample.temperature, top_p=sample.top_p, top_k=sample.top_k, greedy=greedy)
        episodes = sample_episodes(model, tokenizer, prompts, self.make_env, n=n, limits=self.limits, sampling=args,
                                   tools=dict(self.tools), tool_limits=self.tool_limits, tool_stats=stats,
                                   stop_strings=sample.stop_strings, system_prompt=sample.system_prompt,
                                   chat_template=sample.chat_template, env_seeds=env_seeds, generator=generator,
                                   env_name=self.env_spec, fast_decode=sample.fast_decode,
                                   env_timeout_s=self.env_timeout_s, on_env_error=self.on_env_error)
        return episodes_to_rollout(episodes, tokenizer.pad_token_id, n=n, tool_stats=stats)


def episodes_to_rollout(episodes: list[Episode], pad_id: int, *, n: int, tool_stats: ToolStats | None = None
                        ) -> EpisodeRollout:
    """Episodes (``n`` per prompt, prompt-major) as one :class:`EpisodeRollout` (see the module docstring)."""
    if not episodes or len(episodes) % n:
        raise ValueError(f"episodes_to_rollout: {len(episodes)} episodes is not a whole number of groups of {n}")
    for ep in episodes:
        ep.check()
    prompt_ids_BP, prompt_mask_BP = left_pad([ep.token_ids[:ep.prompt_len] for ep in episodes], pad_id)
    B = len(episodes)
    C = max(len(ep.token_ids) - ep.prompt_len for ep in episodes)
    ids_BC = torch.full((B, C), pad_id, dtype=torch.long)
    action_BC = torch.zeros((B, C), dtype=torch.bool)
    lp_BC = torch.zeros((B, C), dtype=torch.float32)
    r_BC = torch.zeros((B, C), dtype=torch.float32)
    turn_BC = torch.full((B, C), -1, dtype=torch.long)
    for i, ep in enumerate(episodes):
        p, c = ep.prompt_len, len(ep.token_ids) - ep.prompt_len
        if ep.action_mask[:p] != [False] * p:
            raise ValueError(f"episodes_to_rollout: episode of prompt {ep.prompt.id!r} has actions in its prompt")
        ids_BC[i, :c] = torch.tensor(ep.token_ids[p:], dtype=torch.long)
        action_BC[i, :c] = torch.tensor(ep.action_mask[p:], dtype=torch.bool)
        lp_BC[i, :c] = torch.tensor(ep.sample_logprobs[p:], dtype=torch.float32)
        r_BC[i, :c] = torch.tensor(ep.token_rewards[p:], dtype=torch.float32)
        for k, turn in enumerate(ep.turns):
            turn_BC[i, turn.start - p:turn.end - p] = k
    stats = tool_stats or ToolStats()
    return EpisodeRollout(
        prompts=[ep.prompt for ep in episodes], completions=[ep.turns[-1].text for ep in episodes],
        prompt_ids_BP=prompt_ids_BP.cpu(), prompt_mask_BP=prompt_mask_BP.cpu(), completion_ids_BC=ids_BC,
        completion_mask_BC=action_BC, sample_logprobs_BC=lp_BC,
        group_ids_B=torch.arange(B // n).repeat_interleave(n), finished_B=torch.tensor([ep.done for ep in episodes]),
        env_rewards_BC=r_BC, turn_BC=turn_BC, episodes=list(episodes), tool_calls=stats.calls,
        tool_errors=dict(stats.errors))


def concat_episode_rollouts(parts: list[EpisodeRollout], pad_id: int, n: int) -> EpisodeRollout:
    """One batch from several (prompt-major order kept; groups renumbered)."""
    stats = ToolStats()
    for r in parts:
        stats.calls += r.tool_calls
        stats.errors.update(r.tool_errors)
    return episodes_to_rollout([ep for r in parts for ep in r.episodes], pad_id, n=n, tool_stats=stats)


def sample_episode_step(model, tokenizer, prompts: list[Prompt], st, *, step: int, first: int = 0,
                        rank: int | None = None, seeded: Callable[..., torch.Generator]) -> EpisodeRollout:
    """The step's sample stage for episodes (``st``: the step's ``StepSettings``; ``seeded(*key)``: a
    generator seeded by (seed, step, *key)), as :func:`seqpg.training.step.sample` samples completions:
    with ``seed_per_prompt`` each prompt's episodes by their own generator of ("prompt", its index
    ``first + i``), so they do not depend on which process samples them; else all together from the global
    RNG (one process) or a generator of ("rank", rank).  Environments are reset with :func:`env_seed` of
    the prompt's global index either way."""
    ep, n = st.episode, st.samples_per_prompt
    seeds = [env_seed(st.seed, step, first + i) for i in range(len(prompts))]
    if st.seed_per_prompt:
        parts = [ep.sample(model, tokenizer, [p], st.sample, n=n, env_seeds=[seeds[i]],
                           generator=seeded("prompt", first + i))
                 for i, p in enumerate(prompts)]
        rollout = concat_episode_rollouts(parts, tokenizer.pad_token_id, n)
    else:
        gen = seeded("rank", rank) if rank is not None else None
        rollout = ep.sample(model, tokenizer, prompts, st.sample, n=n, env_seeds=seeds, generator=gen)
    check_not_all_failed(rollout.episodes, ep.env_spec)  # one bad episode never stops a run; all of them do
    return rollout


def env_seed(seed: int, step: int, prompt_index: int) -> int:
    """The reset seed of the environments of prompt ``prompt_index`` (in the step's global batch) at ``step``."""
    digest = hashlib.sha256(repr((seed, step, "env", prompt_index)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & (2**31 - 1)


def score_episodes(rollout: EpisodeRollout, scorers, *, env_weight: float, on_error: str, tokenizer) -> ScoredBatch:
    """The scorers on each episode's final model turn (as today), plus the environment's per-turn rewards
    (``env_weight`` x, dense, on each turn's last token); ``scores["env"]`` is each episode's environment
    return (unweighted)."""
    from ..rewards.scorers import score_batch

    B = rollout.batch_size
    if scorers:
        scored = score_batch(rollout, scorers, on_error=on_error, tokenizer=tokenizer)
    else:
        scored = ScoredBatch(rollout=rollout, rewards_B=torch.zeros(B), scores={})
    dense_BC = env_weight * rollout.env_rewards_BC
    scored.token_rewards_BC = dense_BC if scored.token_rewards_BC is None else scored.token_rewards_BC + dense_BC
    scored.scores[ENV_SCORE] = rollout.env_rewards_BC.sum(dim=1)
    scored.rollout = rollout
    return scored


def reported_rewards(scored: ScoredBatch) -> torch.Tensor:
    """(B,) the reward a sample is logged, evaluated and explained with: an episode's whole return
    (:func:`seqpg.batch.sequence_returns`), a single-turn completion's sequence reward (``rewards_B``)."""
    return sequence_returns(scored) if isinstance(scored.rollout, EpisodeRollout) else scored.rewards_B


def episode_metrics(rollout: EpisodeRollout, gather_cat, all_reduce_sum) -> dict[str, float]:
    """The step's episode statistics over all processes: turns, how episodes ended, context share, tools."""
    turns_B = torch.tensor([float(len(ep.turns)) for ep in rollout.episodes])
    done_B = torch.tensor([float(ep.done) for ep in rollout.episodes])
    actions, span = rollout.completion_lengths_B.sum().float(), rollout.span_lengths_B.sum().float()
    sums = all_reduce_sum(torch.stack([actions, span, torch.tensor(float(rollout.tool_calls))]))
    m = {"episode/turns": float(gather_cat(turns_B).mean()), "episode/done_frac": float(gather_cat(done_B).mean()),
         "episode/context_frac": 1.0 - float(sums[0] / sums[1].clamp(min=1)), "episode/tool_calls": float(sums[2])}
    from .tools import ERROR_KINDS
    errors = all_reduce_sum(torch.tensor([float(rollout.tool_errors.get(k, 0)) for k in ERROR_KINDS]))
    m.update({f"episode/tool_errors/{k}": float(v) for k, v in zip(ERROR_KINDS, errors.tolist())})
    env_errors = all_reduce_sum(torch.tensor(float(sum(ep.env_error is not None for ep in rollout.episodes))))
    m["episode/env_errors"] = float(env_errors)
    return m
