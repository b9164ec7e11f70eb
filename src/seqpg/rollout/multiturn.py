"""The batched multi-turn sampler: all episodes of a step advance together, turn by turn.

Each turn has two phases, both batched over the episodes still running:

1. **Model**: every episode's new context tokens (the first observation at turn 0; later its
   last turn's final token and the environment's delta) are fed as ONE (B, D) chunk with the KV
   cache of everything before, rows left-padded inside the chunk (padding masked out; positions,
   and a sliding window's width (Gemma 3's), counting each row's real tokens only, so a row computes
   exactly what it would alone).  The logits of the chunk's last column give each row's first
   token; decoding then runs one token per row per step against the cache, like
   :mod:`seqpg.rollout.sampling`, until every row has ended its turn (EOS, a stop string, or its
   token allowance).  Rows that ended early get padding
   columns, masked out.  Nothing is ever re-encoded: the cache only grows by the new tokens.
   The first inputs are computed once each where episodes share them: identical ones (a group's,
   when its environment's first observation does not depend on the seed) once, and the distinct
   ones' common prefix (the system message, the tool schema) once for the step (:mod:`.prefix`).
2. **Environment**: each turn's text goes to the tool parser (when tools are configured and the
   turn calls one: the tools run, all episodes' calls together, and their results are the
   observation) or else to the environment's ``step``.  The observation is rendered as a token
   delta (:mod:`.chat`) and appended; episodes that are done or out of turns / tokens leave the
   batch and their rows leave the cache.

Sampling is :func:`seqpg.rollout.sampling.choose_tokens` (the recorded log-prob is log softmax(z / T)
of the chosen token), so sampler and trainer log-probs agree on every action token.

The KV cache is :func:`seqpg.rollout.sampling.preallocated_cache`, written in place, sized for the
episode budget and growing (by at least doubling) when padding columns take it beyond: the deltas'
lengths are not known in advance.  The one-token steps run through :mod:`seqpg.rollout.fastdecode` where
it takes the model (``fast_decode``, as in single-turn sampling), without its CUDA graph (the cache's
buffers may move); the chunks of new context run through the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from seqpg.batch import Prompt
from seqpg.model.attention_masks import MASKABLE_ATTENTION, attention_implementation, layer_masks, sliding_window
from seqpg.model.policy import model_device
from seqpg.rollout.prefix import PrefillCount, shared_prefill
from seqpg.rollout.sampling import (CACHE_KWARG, SamplingArgs, choose_tokens, decoder, eos_token_ids,
                                    preallocated_cache, uses_chat_template)

from .chat import render_delta, render_start
from .env_adapters import EpisodeEnv
from .env_errors import ON_ENV_ERROR, EpisodeFailure, fail_episode
from .environments import EpisodeLimits, Message, as_messages
from .episodes import Episode, Turn
from .tools import Tool, ToolLimits, ToolResult, ToolStats, parse_tool_calls, run_tool_calls, template_takes_tools, \
    with_tools


class KVRows:
    """Rows decoding together, each with its own history, in one KV cache; the cache only grows.

    ``extend`` feeds each row some new tokens (at least one), ``step`` one token per row (or a
    masked padding column for rows not writing), ``keep`` drops rows.  Both return the (B, V)
    logits after each row's last real token.  ``capacity``: the cache columns reserved at first (it
    grows beyond them when needed); ``fast_decode``: steps through the fast decoder where it takes
    the model; ``quantize``: its weights' precision there (:func:`seqpg.rollout.sampling.decoder`).
    """

    def __init__(self, model: nn.Module, rows: int, pad_id: int, *, capacity: int = 256,
                 fast_decode: bool = True, quantize: str | None = None) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = model_device(model)
        self.cache = preallocated_cache(model.config, capacity, grow=True)
        self.fast = decoder(model, self.cache, rows, fast_decode, quantize, graph=False)
        self.attn_BW = torch.zeros((rows, 0), dtype=torch.bool, device=self.device)  # (B, W) real cache columns
        self.fed_B = torch.zeros(rows, dtype=torch.long, device=self.device)  # real tokens per row = next position
        self.prefilled = 0  # the first inputs' tokens run through the model (shared ones once)
        self.windowed = sliding_window(model) is not None and attention_implementation(model) in MASKABLE_ATTENTION
        self.dtype = next(model.parameters()).dtype

    def extend(self, new_ids: list[list[int]]) -> torch.Tensor:
        """Feed row i the tokens ``new_ids[i]`` (left-padded into one chunk). -> (B, V) logits.

        Into an empty cache (the first inputs), identical rows are computed once and copied, and the
        distinct rows' common prefix (a system message, a tool schema) once for all (:mod:`.prefix`)."""
        if len(new_ids) != self.attn_BW.shape[0] or any(len(ids) == 0 for ids in new_ids):
            raise ValueError("KVRows.extend: one non-empty token list per row")
        if self.attn_BW.shape[1] == 0:
            return self._start(new_ids)
        return self._forward(*self._chunk(new_ids))

    def _chunk(self, new_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids_BD, real_BD, pos_BD): the rows' new tokens left-padded into one chunk, positions after ``fed_B``."""
        D = max(len(ids) for ids in new_ids)
        ids_BD = torch.full((len(new_ids), D), self.pad_id, dtype=torch.long)
        real_BD = torch.zeros((len(new_ids), D), dtype=torch.bool)
        for i, ids in enumerate(new_ids):
            ids_BD[i, D - len(ids):] = torch.tensor(ids, dtype=torch.long)
            real_BD[i, D - len(ids):] = True
        ids_BD, real_BD = ids_BD.to(self.device), real_BD.to(self.device)
        pos_BD = (self.fed_B[:, None] + real_BD.long().cumsum(dim=1) - 1).clamp(min=0) * real_BD
        return ids_BD, real_BD, pos_BD

    def _start(self, first_ids: list[list[int]]) -> torch.Tensor:
        """The first chunk, into the empty cache: the U distinct rows, their first L columns by
        :func:`.prefix.shared_prefill`, the rest by the model; then each row takes its distinct row's cache."""
        distinct = list(dict.fromkeys(map(tuple, first_ids)))
        where = {ids: u for u, ids in enumerate(distinct)}
        row_of_B = [where[tuple(ids)] for ids in first_ids]
        U = len(distinct)
        self.attn_BW, self.fed_B = self.attn_BW[:U], self.fed_B[:U]
        ids_UD, real_UD, pos_UD = self._chunk([list(ids) for ids in distinct])
        L = shared_prefill(self.model.get_decoder(), ids_UD[:, :-1], real_UD[:, :-1], self.cache,
                           CACHE_KWARG) if U > 1 else 0
        self.attn_BW, self.fed_B = real_UD[:, :L], real_UD[:, :L].sum(dim=1)
        self.prefilled = L + int(real_UD[:, L:].sum())
        logits_UV = self._forward(ids_UD[:, L:], real_UD[:, L:], pos_UD[:, L:])
        if U == len(first_ids):
            return logits_UV
        self.keep(row_of_B)
        return logits_UV[torch.tensor(row_of_B, device=logits_UV.device)]

    def step(self, token_B: torch.Tensor, writing_B: torch.Tensor) -> torch.Tensor:
        """Feed ``token_B`` to the rows where ``writing_B``; the others get a masked column. -> (B, V)."""
        ids_B1 = torch.where(writing_B, token_B, self.pad_id)[:, None]
        pos_B1 = (self.fed_B * writing_B)[:, None]
        if self.fast is None:
            return self._forward(ids_B1, writing_B[:, None], pos_B1)
        self.attn_BW = torch.cat([self.attn_BW, writing_B[:, None]], dim=1)
        logits_BV = self.fast.step(ids_B1, pos_B1, self.attn_BW)
        self.fed_B = self.fed_B + writing_B.long()
        return logits_BV

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.cache.get_seq_length() > 0:
            self.cache.batch_select_indices(idx)
        self.attn_BW, self.fed_B = self.attn_BW[idx], self.fed_B[idx]

    def _forward(self, ids_BD: torch.Tensor, real_BD: torch.Tensor, pos_BD: torch.Tensor) -> torch.Tensor:
        self.attn_BW = torch.cat([self.attn_BW, real_BD], dim=1)
        out = self.model(input_ids=ids_BD, attention_mask=self._mask(pos_BD), position_ids=pos_BD, use_cache=True,
                         logits_to_keep=1, **{CACHE_KWARG: self.cache})
        self.fed_B = self.fed_B + real_BD.sum(dim=1)
        return out.logits[:, -1]

    def _mask(self, pos_BD: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The attention mask of a chunk of D columns, the last D of ``attn_BW`` (B, W): that 2-D mask, which
        the model makes causal; or, for a model with sliding-window layers, one 4-D mask per layer type with
        the window counted in positions (:mod:`seqpg.model.attention_masks`).  The model's own masks count
        it in columns, and a row's cache has masked columns inside it (idle decode steps, chunk padding)."""
        if not self.windowed:
            return self.attn_BW.long()
        W, D = self.attn_BW.shape[1], pos_BD.shape[1]
        causal_DW = torch.ones((D, W), dtype=torch.bool, device=self.device).tril(diagonal=W - D)
        allowed_BDW = causal_DW & self.attn_BW[:, None]  # (B, D, W)
        allowed_BDW[:, :, W - D:] |= torch.eye(D, dtype=torch.bool, device=self.device)  # padding queries stay finite
        pos_BW = (self.attn_BW.long().cumsum(dim=1) - 1).clamp(min=0)  # a real column's position
        return layer_masks(self.model, allowed_BDW, pos_BD, pos_BW, self.dtype)


@dataclass
class _Running:
    """An episode in progress: its environment and the conversation its tokens hold."""

    episode: Episode
    env: EpisodeEnv
    messages: list[Message]
    start_failed: bool = False
    """The environment (or the template) failed before the first turn: the episode began from the task's
    prompt and ends after one model turn (see :mod:`.env_errors`)."""


def sample_episodes(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    make_env: Callable[[], Any],
    *,
    n: int = 1,
    limits: EpisodeLimits,
    env_timeout_s: float,
    on_env_error: str,
    sampling: SamplingArgs = SamplingArgs(),
    tools: dict[str, Tool] | None = None,
    tool_limits: ToolLimits = ToolLimits(),
    tool_stats: ToolStats | None = None,
    stop_strings: Sequence[str] = (),
    system_prompt: str | None = None,
    chat_template: bool | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    env_name: str = "",
    env_seeds: Sequence[int] | None = None,
    fast_decode: bool = True,
    quantize: str | None = None,
    prefill: PrefillCount | None = None,
) -> list[Episode]:
    """``n`` episodes per prompt (episode ``i*n + j`` is prompt ``i``'s j-th, its environment reset
    with ``seed + i*n + j``, or with ``env_seeds[i]`` when given: one seed per prompt, so a prompt's
    episodes start from the same state), sampled together turn by turn.  ``make_env()`` builds one
    environment.

    A turn ends on EOS, on a stop string (the turn's text keeps it) or at its token allowance
    (``limits``); an episode ends when its environment says done, or is truncated at
    ``limits.max_turns`` or when its context reaches ``limits.max_tokens``.  The model is in eval
    mode for the call.  Episodes hold plain lists (CPU); see :func:`.episodes.episodes_to_rollout`.
    ``fast_decode``: one-token steps through :mod:`seqpg.rollout.fastdecode` where it takes the model;
    ``quantize="int8"``: on int8 weights there (the environment's tokens are fed in the model's precision).
    Every call into an environment runs with a time limit of ``env_timeout_s`` (:mod:`.env_adapters`);
    ``on_env_error``: ``drop`` closes an episode whose environment or chat template fails as truncated and
    goes on, ``raise`` stops with :class:`.env_errors.EpisodeFailure` (:mod:`.env_errors`).  Both have no
    default here: the config's (``episode.env_timeout_s``, ``episode.on_env_error``) is the one.
    ``prefill``: where to add the first inputs' tokens run through the model (:mod:`.prefix`).
    """
    if on_env_error not in ON_ENV_ERROR:
        raise ValueError(f"sample_episodes: on_env_error must be one of {ON_ENV_ERROR}, got {on_env_error!r}")
    if not prompts or n < 1:
        raise ValueError(f"sample_episodes: need prompts and n >= 1, got {len(prompts)} prompts, n={n}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    tools = tools or {}
    chat_template = uses_chat_template(tokenizer, chat_template)
    tool_kwargs = with_tools([], tools, template_takes_tools(tokenizer, tools))[1] if chat_template else {}
    eos_ids = set(eos_token_ids(model, tokenizer))
    if env_seeds is not None and len(env_seeds) != len(prompts):
        raise ValueError(f"sample_episodes: {len(env_seeds)} env_seeds for {len(prompts)} prompts")
    seeds = [[env_seeds[i]] * n if env_seeds is not None else [seed + i * n + j for j in range(n)]
             for i in range(len(prompts))]
    name = env_name or "?"
    running = [_start(p, i, seeds[i][j], EpisodeEnv(make_env(), name=name, timeout_s=env_timeout_s), tokenizer,
                      tools, tool_kwargs, system_prompt, chat_template, limits, on_env_error)
               for i, p in enumerate(prompts) for j in range(n)]
    episodes, everyone = [r.episode for r in running], list(running)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            kv = KVRows(model, len(running), tokenizer.pad_token_id, capacity=limits.max_tokens,
                        fast_decode=fast_decode, quantize=quantize)
            fed = [0] * len(running)  # tokens of each episode already in the cache
            while running:
                logits_BV = kv.extend([r.episode.token_ids[f:] for r, f in zip(running, fed)])
                fed = [len(r.episode.token_ids) for r in running]
                turns = _model_turn(kv, logits_BV, running, sampling, generator, limits, eos_ids, tokenizer,
                                    tuple(stop_strings))
                fed = [f + len(t) - 1 for f, t in zip(fed, turns)]  # a turn's last token is fed with the next delta
                _environment_turn(running, turns, tokenizer, tools, tool_kwargs, tool_limits, tool_stats, limits,
                                  chat_template, on_env_error)
                keep = [k for k, r in enumerate(running) if not (r.episode.done or r.episode.truncated)]
                if len(keep) < len(running):
                    running, fed = [running[k] for k in keep], [fed[k] for k in keep]
                    if running:
                        kv.keep(keep)
            if prefill is not None:
                prefill.tokens += kv.prefilled
    finally:
        model.train(was_training)
    for r in everyone:
        r.episode.messages, r.episode.env = r.messages, r.env.user
    return episodes


def _start(prompt: Prompt, group: int, seed: int, env: EpisodeEnv, tokenizer, tools: dict[str, Tool],
           tool_kwargs: dict, system_prompt: str | None, chat_template: bool, limits: EpisodeLimits,
           on_env_error: str) -> _Running:
    """The episode's first observation rendered; if the environment or the template fails here (or the
    observation is over the budget), with ``drop`` the episode starts from the task's prompt instead."""
    episode = Episode(prompt=prompt, group=group, seed=seed)
    try:
        messages, ids = _first_input(env.reset(prompt, seed), tokenizer, tools, tool_kwargs, system_prompt,
                                     chat_template)
        if len(ids) >= limits.max_tokens:
            raise ValueError(f"the first observation is {len(ids)} tokens, no room under max_tokens="
                             f"{limits.max_tokens} (episode.max_episode_tokens)")
        failed = False
    except Exception as e:  # noqa: BLE001 - whatever the environment or template raised: the episode fails
        fail_episode(episode, env.name, "reset", e, on_env_error)
        messages, ids = _first_input(prompt.text, tokenizer, tools, tool_kwargs, system_prompt, chat_template)
        failed = True
    if len(ids) >= limits.max_tokens:
        raise ValueError(f"sample_episodes: prompt {prompt.id!r} is {len(ids)} tokens, no room under "
                         f"max_tokens={limits.max_tokens}")
    episode.prompt_len = len(ids)
    episode.append(ids, action=False)
    return _Running(episode, env, messages, start_failed=failed)


def _first_input(obs, tokenizer, tools: dict[str, Tool], tool_kwargs: dict, system_prompt: str | None,
                 chat_template: bool) -> tuple[list[Message], list[int]]:
    messages = obs if isinstance(obs, list) else as_messages(obs, where="the task's prompt")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if tools and chat_template and not tool_kwargs:
        messages = with_tools(messages, tools, in_template=False)[0]
    return messages, render_start(tokenizer, messages, tool_kwargs, chat_template=chat_template)


def _model_turn(kv: KVRows, logits_BV: torch.Tensor, running: list[_Running], sampling: SamplingArgs,
                generator: torch.Generator | None, limits: EpisodeLimits, eos_ids: set[int], tokenizer,
                stop_strings: tuple[str, ...]) -> list[list[int]]:
    """Decode one turn for every running episode; appends its tokens and log-probs. -> each turn's tokens."""
    B = len(running)
    budget = [limits.turn_budget(len(r.episode.token_ids)) for r in running]  # >= 1: full contexts were cut
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    writing = [True] * B
    while True:
        token_B, logprob_B = choose_tokens(logits_BV, sampling, generator)
        toks, lps = token_B.tolist(), logprob_B.tolist()
        for i in range(B):
            if not writing[i]:
                continue
            tokens[i].append(toks[i])
            logprobs[i].append(lps[i])
            if toks[i] in eos_ids or len(tokens[i]) >= budget[i] or (
                    stop_strings and any(s in tokenizer.decode(tokens[i], skip_special_tokens=True)
                                         for s in stop_strings)):
                writing[i] = False
        if not any(writing):
            break
        writing_B = torch.tensor(writing, device=token_B.device)
        logits_BV = kv.step(token_B, writing_B)
    for r, toks_i, lps_i in zip(running, tokens, logprobs):
        start = len(r.episode.token_ids)
        r.episode.append(toks_i, action=True, logprobs=lps_i)
        r.episode.turns.append(Turn(start=start, end=start + len(toks_i),
                                    text=tokenizer.decode(toks_i, skip_special_tokens=True)))
    return tokens


def _environment_turn(running: list[_Running], turns: list[list[int]], tokenizer, tools: dict[str, Tool],
                      tool_kwargs: dict, tool_limits: ToolLimits, tool_stats: ToolStats | None,
                      limits: EpisodeLimits, chat_template: bool, on_env_error: str) -> None:
    """Answer each episode's last turn (its tools, else its environment); append the observation as a delta.

    Free-function tools of every episode run together in the forked runner; an environment's own
    methods run on its instance, in-process (:mod:`.env_adapters`).  A failure of the environment or the
    template closes that episode only (:mod:`.env_errors`)."""
    calls = ({k: parse_tool_calls(r.episode.turns[-1].text, tools, tool_limits.max_calls) for k, r in enumerate(running)
              if not r.start_failed} if tools else {})
    calls = {k: c for k, c in calls.items() if c}
    forked = [c for k in sorted(calls) for c in calls[k] if not _is_method(c, tools)]
    forked_results = run_tool_calls(forked, tools, tool_limits, tool_stats) if forked else []
    for k, (r, toks) in enumerate(zip(running, turns)):
        ep, turn = r.episode, r.episode.turns[-1]
        r.messages = r.messages + [{"role": "assistant", "content": _turn_content(tokenizer, toks)}]
        if r.start_failed:
            ep.truncated = True  # the environment never started: the turn gets no reward
            continue
        mine = calls.get(k, [])
        n_forked = sum(not _is_method(c, tools) for c in mine)
        own, forked_results = forked_results[:n_forked], forked_results[n_forked:]
        try:
            new = _answer(r, turn, mine, own, tools, tool_limits, tool_stats)
            if not (ep.done or ep.truncated) and limits.truncated(turns=len(ep.turns), context_tokens=len(ep.token_ids)):
                ep.truncated = True
            if ep.done or ep.truncated:
                turn.reward += r.env.final_reward()
                continue
            delta = render_delta(tokenizer, r.messages, new, ep.token_ids, tool_kwargs, chat_template=chat_template)
            if limits.truncated(turns=len(ep.turns), context_tokens=len(ep.token_ids) + len(delta)):
                ep.truncated = True  # no room left to answer the observation: it is not appended
                turn.reward += r.env.final_reward()
                continue
        except EpisodeFailure:
            raise
        except Exception as e:  # noqa: BLE001 - the environment's or the template's failure ends this episode
            turn.reward = 0.0
            ep.done = False
            fail_episode(ep, r.env.name, f"turn {len(ep.turns) - 1}", e, on_env_error)
            continue
        ep.append(delta, action=False)
        r.messages = r.messages + new


def _is_method(call, tools: dict[str, Tool]) -> bool:
    return call.error is None and tools[call.name].method


def _answer(r: _Running, turn: Turn, calls: list, forked: list[ToolResult], tools: dict[str, Tool],
            limits: ToolLimits, stats: ToolStats | None) -> list[Message]:
    """The messages answering ``turn``: its tool results (then what ``tool_step`` adds), or the step's
    observation; sets the turn's reward and info and the episode's done / truncated."""
    ep = r.episode
    if calls:
        results, forked = [], list(forked)
        for call in calls:
            if _is_method(call, tools):
                results.append(r.env.call_tool(tools[call.name], call.arguments, limits.max_chars))
            else:
                results.append(forked.pop(0))
                results[-1].arguments = dict(call.arguments)
        if stats is not None:
            stats.add([res for call, res in zip(calls, results) if _is_method(call, tools)])
        turn.tool_results = results
        new = [res.as_message() for res in results]
        step = r.env.tool_step(turn.text, results)
        if step is None:
            return new
    else:
        new, step = [], r.env.step(turn.text)
    turn.reward, turn.info = step.reward, step.info
    ep.done, ep.truncated = step.done, step.truncated and not step.done
    if step.observation is not None and not step.done:
        new = new + as_messages(step.observation, where=f"environment {r.env.name}: observation")
    return new


def _turn_content(tokenizer, toks: list[int]) -> str:
    """The assistant message of a turn: its exact text, a final EOS left for the template to write."""
    from .chat import decode_kept

    eos = tokenizer.eos_token_id
    return decode_kept(tokenizer, toks[:-1] if toks and toks[-1] == eos else toks)
