"""Batched sampling with a KV cache: our own decode loop, producing a ``RolloutBatch``.

Each prompt is tokenised once (chat template with the assistant generation prompt) and the
rows are left-padded to P.  The prompts' first P - 1 columns are prefilled once per prompt
(the decoder trunk only: no logits are needed there; the prompts' common prefix, a system
message, once for all of them: :mod:`seqpg.rollout.prefix`), the cache is then repeated for the ``n``
samples of each prompt, and decoding starts by feeding every row its prompt's last column.
Each step runs one token per row against the KV cache (preallocated for P + max_new_tokens
positions and written in place) and calls the LM head on (B, 1) hidden states only.  Position
ids count real tokens only, so a left-padded row decodes exactly as it would alone.  Called
under ``torch.autocast(..., dtype=torch.bfloat16)`` it samples in bf16, each weight cast once
per call (autocast's cast cache works under ``no_grad``, not under ``inference_mode``).

Sampling: ``y ~ softmax(filter(z) / T)`` where ``filter`` keeps the ``top_k`` largest logits and
the smallest nucleus of probability ``>= top_p`` (Holtzman et al. 2020, arXiv:1904.09751).
The log-probability recorded for each token is ``log softmax(z / T)[y]``: the full tempered
distribution, i.e. what ``completion_logprobs`` computes at the same temperature.  The top-k /
top-p truncation is NOT reflected in it (with truncation the recorded value is the log-prob under
the untruncated policy, not the probability the token was actually drawn with).

Stopping: a row stops on EOS, or when its decoded completion contains a stop string.  In the
second case the token that completed the stop string stays in ``completion_ids_BC`` with mask
True (it was sampled and is trained on), while the completion *text* is cut just before the
first occurrence of the stop string.  After a row stops it gets pad tokens, mask False and
log-prob 0.  ``finished_B`` is False for rows cut off by ``max_new_tokens``.  On the CPU decoder
(:mod:`seqpg.rollout.fastdecode`) rows that stopped also leave the decode batch (``_keep``) so that they stop
costing products; the rollout is bit for bit the same (one uniform per rollout row and step).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Sequence

import torch
import transformers
from torch import nn

from seqpg.batch import Prompt, RolloutBatch
from seqpg.rollout.fastdecode import FastDecoder
from seqpg.rollout.fastdecode import supports as fastdecode_supports
from seqpg.rollout.prefix import shared_prefill
from seqpg.model.policy import model_device, position_ids_from_mask


@dataclass
class SamplingArgs:
    """How to choose each token."""

    temperature: float = 1.0
    """Softmax temperature T > 0; the recorded log-probs are at this temperature."""
    top_p: float = 1.0
    """Nucleus: keep the most likely tokens whose probability sums to >= top_p (1 keeps all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all)."""
    greedy: bool = False
    """Take the argmax instead of sampling (log-probs are still recorded at ``temperature``)."""


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    stop_strings: Sequence[str] = (),
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    generator: torch.Generator | None = None,
    fast_decode: bool = True,
    quantize: str | None = None,
) -> RolloutBatch:
    """Sample ``n`` completions for each prompt; rows ``i*n .. i*n+n-1`` belong to prompt ``i``.

    The model is put in eval mode for the call (its mode is restored afterwards).  With
    ``fast_decode`` (default) Llama-family models decode through :mod:`seqpg.rollout.fastdecode`;
    other models, and ``fast_decode=False``, through the model's own forward.  Decoding runs on
    the model's device; the returned batch holds CPU tensors.  ``generator`` may live on either
    device (the uniform draws are made on its device).  ``chat_template``: see :func:`uses_chat_template`.
    ``quantize="int8"``: the one-token steps' products run on int8 weights (:class:`FastDecoder`; the
    prefill keeps the model's precision); a model the fast decoder does not take is then a ValueError.
    """
    args = SamplingArgs(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
    _check_args(args, n=n, max_new_tokens=max_new_tokens, num_prompts=len(prompts))
    token_lists = [encode_prompt(tokenizer, p.text, chat_template=chat_template, system_prompt=system_prompt)
                   for p in prompts]
    prompt_ids_GP, prompt_mask_GP = left_pad(token_lists, tokenizer.pad_token_id)  # G = len(prompts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: under it autocast re-casts every weight at every step
            ids_BC, mask_BC, logprobs_BC, finished_B, texts, prefilled = _decode(
                model, tokenizer, prompt_ids_GP.to(device), prompt_mask_GP.to(device), n, args, max_new_tokens,
                tuple(stop_strings), generator, fast_decode, quantize)
    finally:
        model.train(was_training)
    prompt_ids_BP = prompt_ids_GP.repeat_interleave(n, dim=0)  # (B, P), B = len(prompts) * n
    prompt_mask_BP = prompt_mask_GP.repeat_interleave(n, dim=0)  # (B, P)
    return RolloutBatch(
        prompts=[p for p in prompts for _ in range(n)],
        completions=texts,
        prompt_ids_BP=prompt_ids_BP,
        prompt_mask_BP=prompt_mask_BP,
        completion_ids_BC=ids_BC.cpu(),
        completion_mask_BC=mask_BC.cpu(),
        sample_logprobs_BC=logprobs_BC.cpu(),
        group_ids_B=torch.arange(len(prompts)).repeat_interleave(n),
        finished_B=finished_B.cpu(),
        prefill_tokens=prefilled,
    )


def _check_args(args: SamplingArgs, *, n: int, max_new_tokens: int, num_prompts: int) -> None:
    if num_prompts == 0:
        raise ValueError("generate: no prompts")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: n and max_new_tokens must be >= 1, got {n}, {max_new_tokens}")
    if args.temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 (use greedy=True for argmax), got {args.temperature}")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError(f"generate: need 0 < top_p <= 1 and top_k >= 0, got {args.top_p}, {args.top_k}")


def uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template: ``chat_template`` when given, else (None)
    whether the tokenizer has one.  Asking for one (True) from a tokenizer without one (a base model's,
    such as gemma3-270m's) is a ValueError naming ``sampling.chat_template=false``."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ValueError("sampling.chat_template=true, but the model's tokenizer has no chat template (a base model); "
                         "set sampling.chat_template=false (or leave it unset) to feed prompts as raw text")
    return bool(chat_template)


def encode_prompt(tokenizer, text: str, *, chat_template: bool | None = None,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt: the chat template with the assistant generation prompt, or raw text
    (``chat_template``: :func:`uses_chat_template`)."""
    if not uses_chat_template(tokenizer, chat_template):
        return list(tokenizer(text).input_ids)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False).input_ids)


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BP, mask_BP): the lists left-padded to the longest; mask True on real tokens."""
    P = max(len(t) for t in token_lists)
    ids_BP = torch.full((len(token_lists), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(token_lists), P), dtype=torch.bool)
    for i, toks in enumerate(token_lists):
        if toks:
            ids_BP[i, P - len(toks):] = torch.tensor(toks, dtype=torch.long)
            mask_BP[i, P - len(toks):] = True
    return ids_BP, mask_BP

# transformers renamed the ``past_key_values`` argument to ``cache`` (5.x); pass whichever it takes.
CACHE_KWARG = "cache" if "cache" in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


def _decode(
    model: nn.Module,
    tokenizer,
    prompt_ids_GP: torch.Tensor,
    prompt_mask_GP: torch.Tensor,
    n: int,
    args: SamplingArgs,
    max_new_tokens: int,
    stop_strings: tuple[str, ...],
    generator: torch.Generator | None,
    fast_decode: bool = True,
    quantize: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], int]:
    """Prefill, then one token per row per step until every row stops or the budget runs out.

    Returns (ids_BC, mask_BC, logprobs_BC, finished_B, completion texts, the prompt tokens run through the
    model: the prefill's and the prompts' last column in every row), C <= max_new_tokens.
    """
    G, P = prompt_ids_GP.shape
    B = G * n
    if isinstance(model, nn.parallel.DistributedDataParallel):  # sampling needs no gradient sync
        model = model.module
    device = prompt_ids_GP.device  # the model's
    eos_ids_E = torch.tensor(eos_token_ids(model, tokenizer), dtype=torch.long, device=device)  # (E,)
    positions_GP = position_ids_from_mask(prompt_mask_GP)
    cache = {CACHE_KWARG: preallocated_cache(model.config, P + max_new_tokens)}  # filled in place by each call
    prefilled = B  # the prompts' last column, fed to every row at the first step
    if P > 1:  # columns 0 .. P-2 once per prompt (their common prefix once), trunk only; then n copies of each row
        trunk = model.get_decoder()
        shared = shared_prefill(trunk, prompt_ids_GP[:, :-1], prompt_mask_GP[:, :-1], cache[CACHE_KWARG], CACHE_KWARG)
        prefilled += shared + int(prompt_mask_GP[:, shared:-1].sum())
        if shared < P - 1:
            trunk(input_ids=prompt_ids_GP[:, shared:-1], attention_mask=prompt_mask_GP[:, :-1].long(),
                  position_ids=positions_GP[:, shared:-1], use_cache=True, **cache)
        cache[CACHE_KWARG].batch_repeat_interleave(n)
    attn_LW = torch.zeros((B, P + max_new_tokens), dtype=torch.bool, device=device)  # column P+t set when token t goes in
    attn_LW[:, :P] = prompt_mask_GP.repeat_interleave(n, dim=0)
    input_L1 = prompt_ids_GP[:, -1:].repeat_interleave(n, dim=0)  # (L, 1) the prompts' last column
    pos_L1 = positions_GP[:, -1:].repeat_interleave(n, dim=0)  # (L, 1)
    fast = decoder(model, cache[CACHE_KWARG], B, fast_decode, quantize)
    compact = fast is not None and not fast.graph  # rows that stopped may leave the decode batch (_leave)
    live_L = torch.arange(B, device=device)  # (L,) the rollout row of each decode row; L = B until rows leave
    rows = _Rows(B, tokenizer, stop_strings, device)
    for t in range(max_new_tokens):
        if fast is not None:
            logits_LV = fast.step(input_L1, pos_L1, attn_LW[:, :P + t])
        else:
            logits_LV = model(input_ids=input_L1, attention_mask=attn_LW[:, :P + t].long(), position_ids=pos_L1,
                              use_cache=True, logits_to_keep=1, **cache).logits[:, -1]
        # one uniform per rollout row per step, drawn whether or not the row is still decoded: the same
        # draws, hence the same samples, as without rows leaving
        uniform_B = None if args.greedy else draw_uniforms(B, generator, device)
        token_L, logprob_L = choose_tokens(logits_LV, args, generator,
                                           uniform_B=None if uniform_B is None else uniform_B[live_L])
        token_B, logprob_B = token_L, logprob_L
        if len(live_L) < B:  # back to the rollout's rows; the rows that left get pad / 0 below anyway
            token_B = token_L.new_zeros(B).index_copy_(0, live_L, token_L)
            logprob_B = logprob_L.new_zeros(B).index_copy_(0, live_L, logprob_L)
        active_B = ~rows.finished_B  # (B,) rows that produce token t
        rows.append(torch.where(active_B, token_B, tokenizer.pad_token_id),
                    torch.where(active_B, logprob_B, 0.0), active_B, eos_ids_E)
        if bool(rows.finished_B.all()):
            break
        attn_LW[:, P + t] = active_B[live_L]
        input_L1, pos_L1 = rows.ids[-1][live_L].unsqueeze(1), pos_L1 + 1
        keep_L = _keep(rows.finished_B[live_L], steps_left=max_new_tokens - t - 1) if compact else None
        if keep_L is not None:
            live_L, input_L1, pos_L1, attn_LW = live_L[keep_L], input_L1[keep_L], pos_L1[keep_L], attn_LW[keep_L]
            cache[CACHE_KWARG].batch_select_indices(keep_L)
    return (torch.stack(rows.ids, dim=1), torch.stack(rows.masks, dim=1), torch.stack(rows.logprobs, dim=1),
            rows.finished_B, rows.texts(), prefilled)


def decoder(model: nn.Module, cache, rows: int, fast_decode: bool, quantize: str | None,
            graph: bool | None = None) -> FastDecoder | None:
    """The fast decoder of ``model`` (None: decode with the model's own forward), quantised by ``quantize``.
    A quantised sampler needs the fast decoder: without it, a ValueError naming why."""
    if fast_decode and fastdecode_supports(model):
        return FastDecoder(model, cache, rows=rows, graph=graph, quantize=quantize)
    if quantize is not None:
        why = "sampling.fast_decode=false" if not fast_decode else \
            f"a {type(model).__name__} (not a plain Llama-family or Gemma 3 model, or wrapped by LoRA or hooks)"
        raise ValueError(f"sampling.dtype={quantize} runs in seqpg's fast decoder, which does not take {why}; "
                         "use sampling.dtype=bfloat16 or null")
    return None


def _keep(finished_L: torch.Tensor, steps_left: int) -> torch.Tensor | None:
    """The decode rows to keep when rows that stopped should leave the batch, else None. (K,) long

    A row that stopped still costs a full row of every product at every step: on a CPU, where the
    decode's products are bound by arithmetic (AVX2) or nearly so, the step's time falls with its
    row count.  Rows leave when the stopped ones times the steps left reach a quarter of the rows
    (moving the KV cache's rows costs about a tenth of a step).  At least two rows stay (a stopped
    one kept beside the last running one): oneDNN's one-row product rounds differently from the
    same row in a batch, and every row's logits must be bit for bit those of the full batch.
    """
    L = finished_L.shape[0]
    stopped = int(finished_L.sum())
    if stopped == 0 or L <= 2 or stopped * steps_left * 4 < L:
        return None
    keep_L = (~finished_L).nonzero().squeeze(1)
    if keep_L.numel() < 2:
        keep_L = torch.cat([keep_L, finished_L.nonzero()[:1, 0]]).sort().values
    return keep_L


class _PreallocatedLayer(transformers.cache_utils.DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers with room for ``capacity`` positions.

    ``update`` writes the new positions in place and returns views of the filled part, where the
    dynamic layer concatenates (copying the whole cache of every layer at every step).
    """

    def __init__(self, capacity: int, grow: bool = False) -> None:
        super().__init__()
        self.capacity, self.length, self.grow = capacity, 0, grow

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device, self.length = key_states.device, 0
        # zeros, not garbage: a decode step that attends over the whole capacity (fastdecode's CUDA
        # graph) masks the unwritten columns, and 0 * NaN would still be NaN
        self._keys = key_states.new_zeros((B, H, self.capacity, D))
        self._values = value_states.new_zeros((B, value_states.shape[1], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity and self.grow:  # at least double: a copy of the cache now and then, not each step
            self._reserve(max(end, 2 * self.capacity))
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions, capacity {self.capacity}")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def _reserve(self, capacity: int) -> None:
        """New buffers with room for ``capacity`` positions, the filled ones copied, the rest zero."""
        keys = self._keys.new_zeros(self._keys.shape[:2] + (capacity,) + self._keys.shape[3:])
        values = self._values.new_zeros(self._values.shape[:2] + (capacity,) + self._values.shape[3:])
        keys[:, :, :self.length] = self._keys[:, :, :self.length]
        values[:, :, :self.length] = self._values[:, :, :self.length]
        self._keys, self._values, self.capacity = keys, values, capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (new buffers of the same capacity, unwritten columns still zero)."""
        if self.is_initialized:
            self._keys, self._values = self._keys.index_select(0, indices), self._values.index_select(0, indices)
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def spread_rows(self, shift_B: torch.Tensor) -> None:
        """The one row held becomes B rows, row b's filled columns shifted right by ``shift_B[b]`` (B,):
        column c of row b holds the row's column c - shift_B[b], zero where that is below 0; the length stays
        (:mod:`seqpg.rollout.prefix`)."""
        if not self.is_initialized:
            return
        if self._keys.shape[0] != 1:
            raise ValueError(f"spread_rows: the cache holds {self._keys.shape[0]} rows, expected 1")
        src_BL = torch.arange(self.length, device=self._keys.device)[None] - shift_B.to(self._keys.device)[:, None]
        real_BL = src_BL >= 0
        idx_N = src_BL.clamp(min=0).reshape(-1)

        def spread(buf_1HCD: torch.Tensor) -> torch.Tensor:
            B, L = real_BL.shape
            out = buf_1HCD.new_zeros((B,) + buf_1HCD.shape[1:])
            rows_HBLD = buf_1HCD[0].index_select(1, idx_N).view(buf_1HCD.shape[1], B, L, -1)
            out[:, :, :L] = rows_HBLD.transpose(0, 1) * real_BL[:, None, :, None]
            return out

        self._keys, self._values = spread(self._keys), spread(self._values)
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def preallocated_cache(config, capacity: int, grow: bool = False) -> transformers.Cache:
    """A KV cache for a model of ``config`` holding up to ``capacity`` positions, written in place;
    ``grow``: a write beyond ``capacity`` moves the layer to buffers at least twice as large (the
    multi-turn sampler's, whose observations' lengths are not known in advance) instead of failing."""
    n_layers = config.get_text_config(decoder=True).num_hidden_layers
    return transformers.Cache(layers=[_PreallocatedLayer(capacity, grow) for _ in range(n_layers)])


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (which may list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []))
    if not ids:
        raise ValueError("generate: the tokenizer has no eos_token_id")
    return sorted(ids)


class _Rows:
    """Per-step columns of the completion, and which rows have stopped (and where their text ends)."""

    def __init__(self, B: int, tokenizer, stop_strings: tuple[str, ...], device: torch.device) -> None:
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.ids: list[torch.Tensor] = []  # C x (B,) long
        self.masks: list[torch.Tensor] = []  # C x (B,) bool
        self.logprobs: list[torch.Tensor] = []  # C x (B,) float32
        self.finished_B = torch.zeros(B, dtype=torch.bool, device=device)
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.text_end: list[int | None] = [None] * B  # where the text is cut (a stop string), per row

    def append(self, token_B: torch.Tensor, logprob_B: torch.Tensor, active_B: torch.Tensor,
               eos_ids_E: torch.Tensor) -> None:
        self.ids.append(token_B)
        self.masks.append(active_B)
        self.logprobs.append(logprob_B.float())
        tokens, flags = token_B.tolist(), active_B.tolist()  # one read each (a device sync on a GPU)
        active = [i for i, on in enumerate(flags) if on]
        for i in active:
            self.tokens[i].append(tokens[i])
        self.finished_B = self.finished_B | (active_B & torch.isin(token_B, eos_ids_E))
        if self.stop_strings:
            finished = self.finished_B.tolist()
            self._check_stop_strings([i for i in active if not finished[i]])

    def _check_stop_strings(self, rows: list[int]) -> None:
        for i, text in zip(rows, self.tokenizer.batch_decode([self.tokens[i] for i in rows], skip_special_tokens=True)):
            hits = [k for k in (text.find(s) for s in self.stop_strings) if k >= 0]
            if hits:
                self.text_end[i] = min(hits)
                self.finished_B[i] = True

    def texts(self) -> list[str]:
        decoded = self.tokenizer.batch_decode(self.tokens, skip_special_tokens=True)
        return [text if end is None else text[:end] for text, end in zip(decoded, self.text_end)]


def choose_tokens(logits_BV: torch.Tensor, args: SamplingArgs, generator: torch.Generator | None = None, *,
                  uniform_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_B, logprob_B): the chosen token and its log-prob under the full softmax(z / T).

    ``uniform_B``: the rows' U[0, 1) draws (float64) for :func:`sample_categorical`, when the caller
    drew them (default: drawn here from ``generator``)."""
    if logits_BV.dim() != 2:
        raise ValueError(f"choose_tokens: logits must be (B, V), got {tuple(logits_BV.shape)}")
    scaled_BV = logits_BV.float()
    if args.temperature != 1.0:
        scaled_BV = scaled_BV / args.temperature
    logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
    if args.greedy:
        token_B = scaled_BV.argmax(dim=-1)
    else:
        probs_BV = torch.softmax(filter_top_k_top_p(scaled_BV, args.top_k, args.top_p), dim=-1)
        token_B = sample_categorical(probs_BV, generator, uniform_B=uniform_B)
    return token_B, logprobs_BV.gather(1, token_B.unsqueeze(1)).squeeze(1)


def sample_categorical(probs_BV: torch.Tensor, generator: torch.Generator | None = None, *,
                       uniform_B: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row drawn with probability ``probs_BV[i]`` (rows sum to 1): inverse CDF. (B,)

    Draws u ~ U[0, 1) per row (:func:`draw_uniforms`, or the given ``uniform_B``) and returns the
    first index whose cumulative probability exceeds u times the row's total (the cumulative sum
    runs in float64, so zero-probability entries are never chosen and rounding does not tilt the
    draw).  ``torch.multinomial`` gives the same distribution but spends ~20 ms per (16, 49152) call
    on 2 CPU cores drawing one exponential variate per entry; this draws one uniform per row.
    """
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    if uniform_B is None:
        uniform_B = draw_uniforms(probs_BV.shape[0], generator, probs_BV.device)
    u_B1 = uniform_B.unsqueeze(1) * cdf_BV[:, -1:]
    token_B = torch.searchsorted(cdf_BV, u_B1, right=True).squeeze(1)
    return token_B.clamp_(max=probs_BV.shape[-1] - 1)


def draw_uniforms(rows: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(rows,) float64 draws from U[0, 1), made on ``generator``'s device (else ``device``), on ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(rows, dtype=torch.float64, generator=generator, device=where).to(device)


def filter_top_k_top_p(scaled_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < scaled_BV.shape[-1]:
        kth_B1 = scaled_BV.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # the most likely token always has 0
        drop_BV = torch.zeros_like(mass_before_BV, dtype=torch.bool).scatter(1, order_BV, mass_before_BV >= top_p)
        scaled_BV = scaled_BV.masked_fill(drop_BV, float("-inf"))
    return scaled_BV


@dataclass(frozen=True)
class SampleSettings:
    """The sampling section of a run, resolved once: every caller of :func:`generate` in a run (the
    training step, the greedy baseline, ``seqpg explain``, evaluation and pass@k) samples from it."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()
    chat_template: bool | None = None  # None: the tokenizer's template when it has one (uses_chat_template)
    system_prompt: str | None = None
    fast_decode: bool = True
    dtype: str | None = None
    """The sampler's precision (``sampling.dtype``): None, the caller's (the training's); ``bfloat16``: bf16
    autocast around the call; ``int8``: int8 products in the fast decoder."""

    @classmethod
    def from_config(cls, s) -> "SampleSettings":
        """From a :class:`seqpg.config.SamplingConfig`."""
        return cls(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                   stop_strings=tuple(s.stop_strings), chat_template=s.chat_template, system_prompt=s.system_prompt,
                   fast_decode=s.fast_decode, dtype=s.dtype)

    def precision(self, device_type: str) -> ContextManager:
        """The context a sampling call runs in: bf16 autocast for ``dtype=bfloat16``, else the caller's."""
        return torch.autocast(device_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()

    @property
    def quantize(self) -> str | None:
        """What the fast decoder quantises its weights to (``int8``), or None."""
        return "int8" if self.dtype == "int8" else None

    def generate(self, model: nn.Module, tokenizer, prompts: list[Prompt], *, n: int = 1, greedy: bool = False,
                 generator: torch.Generator | None = None) -> RolloutBatch:
        """:func:`generate` with these settings (``greedy``: argmax, log-probs still at the temperature), in the
        sampler's precision (:meth:`precision`)."""
        with self.precision(model_device(model).type):
            return generate(model, tokenizer, prompts, n=n, max_new_tokens=self.max_new_tokens,
                            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, greedy=greedy,
                            stop_strings=self.stop_strings, chat_template=self.chat_template,
                            system_prompt=self.system_prompt, generator=generator, fast_decode=self.fast_decode,
                            quantize=self.quantize)
