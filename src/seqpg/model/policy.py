"""Training-time log-probabilities of sampled completions under the current policy.

For a rollout laid out as ``[prompt (left-padded to P) | completion (right-padded to C)]``,
the log-probability of completion token ``t`` is read from the logits at column ``P + t - 1``:

    log pi(y_t | x, y_<t) = log softmax(z_{P+t-1} / T)[y_t]

Two layouts compute exactly these numbers (up to float rounding):

* **padded** (any batch): the B rows ``[prompt | completion]`` as they are.  Only the ``C + 1``
  last columns of logits are materialised (``logits_to_keep=C+1``; the last column predicts a
  token past the completion and is dropped), so the (B, P, V) prompt logits are never built.
* **shared prompt** (used when rows repeat a prompt, as every group-baseline batch does): the
  rows of one prompt are packed into ONE sequence ``[prompt | y^1_<L1 | y^2_<L2 | ... ]`` (each
  completion without its last token, which nothing attends to; no padding inside), whose
  attention mask lets each completion segment see the prompt and itself only, with position ids
  continuing the prompt's.  The prompt is thus run once per group instead of once per sample,
  and padding only ends the shorter group rows.  For 2 prompts of ~75 tokens x 8 samples of
  <= 32 tokens this is <= 2 x 323 instead of 16 x 107 token positions, with the same logits: the
  trunk's computation for a token depends only on the tokens it attends to and on its position,
  both unchanged.  Logits are kept (``logits_to_keep`` as per-row indices) for the prompt's last
  column, shared by the group's completions, which read their first token's log-prob from it,
  and for every segment column.

The kept logits go to the core's chunked ``token_logprobs`` (or ``token_logprobs_and_entropy``,
one pass for both), which never copy them whole.  The shared-prompt layout needs an attention
implementation that takes a 4D mask as given (sdpa, eager) and transformers >= 5 (per-row
``logits_to_keep``); otherwise the padded layout runs.  Position ids are counted over real tokens only, so a left-padded
row sees the same positions as it would unpadded.

Multi-turn episodes: a row's completion holds the model's turns and the environment's tokens between
them; ``completion_mask_BC`` is True on the model's tokens only (the actions).  Both layouts feed every
completion column up to the last action (``RolloutBatch.span_mask_BC``: the environment's tokens are
context) and return log-probs at the actions only (0 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seqpg.model import segment_attention
from seqpg.batch import RolloutBatch
from seqpg.core import token_logprobs
from seqpg.core.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs_and_entropy
from seqpg.model.attention_masks import MASKABLE_ATTENTION, attention_implementation, layer_masks
from seqpg.model.segment_attention import SegmentLayout

PACKABLE_ATTENTION = MASKABLE_ATTENTION
"""Attention implementations that take the shared-prompt layout's 4D mask as it is."""


@dataclass
class CompletionLogprobs:
    """What one forward pass of the policy over a rollout gives."""

    logprobs_BC: torch.Tensor  # (B, C) float32, log pi(y_t | ...) at the temperature, 0 on padding
    entropy_BC: torch.Tensor | None = None  # (B, C) float32, entropy of the tempered distribution, 0 on padding
    hidden_BCH: torch.Tensor | None = None  # (B, C, H) last hidden state at column P+t-1 (the state before y_t)


def position_ids_from_mask(mask_BL: torch.Tensor) -> torch.Tensor:
    """(B, L) long: for each real token, the number of real tokens before it; 0 on padding."""
    if mask_BL.dim() != 2:
        raise ValueError(f"position_ids_from_mask: mask must be (B, L), got {tuple(mask_BL.shape)}")
    mask_BL = mask_BL.long()
    return (mask_BL.cumsum(dim=1) - 1).clamp(min=0) * mask_BL  # (B, L)


def completion_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> CompletionLogprobs:
    """Log-probabilities (B, C) of ``batch``'s completion tokens under ``model`` at ``temperature``.

    Gradients flow when called outside ``torch.no_grad``.  ``hidden_BCH`` (for a value head on
    the policy's own trunk) comes from the same forward pass, asked for with ``with_hidden``.
    Rows that share a prompt go through the shared-prompt layout (see the module docstring).
    ``batch`` may be on any device: the layout is computed on the CPU and the model's inputs are
    moved to the model's device, where the returned tensors are.
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    device = model_device(model)
    host = batch.to("cpu")
    groups = shared_prompt_groups(host)
    packable = _attention_implementation(model) in PACKABLE_ATTENTION and _takes_per_row_logits_to_keep()
    if groups is not None and packable:
        return _shared_prompt_logprobs(model, host, groups, temperature, with_entropy, with_hidden, device)
    return _padded_logprobs(model, batch.to(device), temperature, with_entropy, with_hidden)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the local shard's under FSDP2; CPU for a model without any)."""
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu")
    return p.to_local().device if hasattr(p, "to_local") else p.device


def _padded_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float, with_entropy: bool,
                     with_hidden: bool) -> CompletionLogprobs:
    C = batch.completion_ids_BC.shape[1]
    mask_BL = batch.attention_mask_BL
    out = model(
        input_ids=batch.input_ids_BL,  # (B, P+C)
        attention_mask=mask_BL.long(),
        position_ids=position_ids_from_mask(mask_BL),
        logits_to_keep=C + 1,
        output_hidden_states=with_hidden,
        use_cache=False,
    )
    logits_BCV = out.logits[:, :-1]  # (B, C, V) column P+t-1 predicts completion token t
    pad_BC = ~batch.completion_mask_BC
    logprobs_BC, entropy_BC = _logprobs_entropy(logits_BCV, batch.completion_ids_BC, temperature, with_entropy)
    logprobs_BC = logprobs_BC.masked_fill(pad_BC, 0.0)
    entropy_BC = entropy_BC.masked_fill(pad_BC, 0.0) if with_entropy else None
    hidden_BCH = out.hidden_states[-1][:, -(C + 1):-1] if with_hidden else None  # (B, C, H)
    return CompletionLogprobs(logprobs_BC=logprobs_BC, entropy_BC=entropy_BC, hidden_BCH=hidden_BCH)


GPU_CHUNK_SIZE = 1024
"""Positions per chunk of the log-prob kernels on a GPU (1024 x 49k vocab x 4 bytes = 201 MB of
scratch): there is no small cache to fit, and each chunk costs ~10 kernel launches.  The CPU keeps
the core's default (``DEFAULT_CHUNK_SIZE``, sized for its cache)."""


def _logprobs_entropy(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float,
                      with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies or None), both from one pass over the logits when both are asked for."""
    chunk = GPU_CHUNK_SIZE if logits_BTV.device.type == "cuda" else DEFAULT_CHUNK_SIZE
    if with_entropy:
        return token_logprobs_and_entropy(logits_BTV, tokens_BT, temperature, chunk_size=chunk)
    return token_logprobs(logits_BTV, tokens_BT, temperature, chunk_size=chunk), None


# ---------------------------------------------------------------------------------------------
# shared-prompt layout


@dataclass
class PromptGroups:
    """Which rows share a prompt: row ``i`` is member ``member_B[i]`` of group ``group_B[i]``."""

    group_B: torch.Tensor  # (B,) long, in [0, G)
    member_B: torch.Tensor  # (B,) long, in [0, K), K = the largest group's size
    first_row_G: torch.Tensor  # (G,) long, one row holding each group's prompt
    num_groups: int
    max_members: int


def shared_prompt_groups(batch: RolloutBatch) -> PromptGroups | None:
    """Rows grouped by identical (left-padded) prompt tokens; None when no two rows share a prompt."""
    ids_BP = batch.prompt_ids_BP.masked_fill(~batch.prompt_mask_BP, -1)  # padding cannot match a token
    _, group_B, counts_G = torch.unique(ids_BP, dim=0, return_inverse=True, return_counts=True)
    if int(counts_G.max()) < 2:
        return None
    order_B = torch.sort(group_B, stable=True).indices  # rows grouped, each group in row order
    starts_G = torch.cumsum(counts_G, 0) - counts_G
    member_B = torch.empty_like(group_B)
    member_B[order_B] = torch.arange(len(group_B)) - starts_G.repeat_interleave(counts_G)
    return PromptGroups(group_B=group_B, member_B=member_B, first_row_G=order_B[starts_G],
                        num_groups=len(counts_G), max_members=int(counts_G.max()))


def _attention_implementation(model: nn.Module) -> str | None:
    return attention_implementation(model)


def _takes_per_row_logits_to_keep() -> bool:
    """Whether the installed transformers takes ``logits_to_keep`` as (rows, positions) indices (5.x)."""
    import transformers

    return hasattr(transformers.modeling_utils, "slice_logits_to_keep")


@dataclass
class _Packed:
    """The shared-prompt layout of a batch: G rows of length L, N kept logit columns per row."""

    ids_GL: torch.Tensor  # (G, L) long: the prompt, each member's completion less its last token, padding
    real_GL: torch.Tensor  # (G, L) bool
    pos_GL: torch.Tensor  # (G, L) long position ids (segments continue their prompt's count)
    segment_GL: torch.Tensor  # (G, L) long: -1 prompt, k >= 0 member k's completion, -2 padding
    keep_GN: torch.Tensor  # (G, N) columns whose logits are needed: the prompt's last, then every segment column
    targets_GN: torch.Tensor  # (G, N) the token each kept column predicts (0: the shared first column, padding)
    flat_BS: torch.Tensor  # (B, C-1) index into the flattened (G*N) kept columns predicting row i's token t+1
    segments: SegmentLayout | None  # the same layout as blocks, for ``seqpg.model.segment_attention`` (when asked)

    def to(self, device: torch.device) -> "_Packed":
        """The layout with its tensors on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        if self.segments is not None:
            moved["segments"] = self.segments.on(device)
        return _Packed(**moved)


def _pack(batch: RolloutBatch, g: PromptGroups, with_segments: bool = False) -> _Packed:
    """Row g: [prompt_g | y^1_{0..L1-2} | y^2_{0..L2-2} | ... | padding]; no padding inside.

    ``with_segments``: also the block layout that ``seqpg.model.segment_attention`` computes with."""
    B, C = batch.completion_ids_BC.shape
    prompt_len_G = batch.prompt_mask_BP[g.first_row_G].sum(dim=1)
    seg_len_B = (batch.span_lengths_B - 1).clamp(min=0)  # a completion's last token is no input
    order_B = torch.argsort(g.group_B * g.max_members + g.member_B)  # rows by (group, member)
    seg_start_B = torch.empty_like(seg_len_B)
    seg_start_B[order_B] = _exclusive_cumsum_per_group(seg_len_B[order_B], g.group_B[order_B])
    row_len_G = prompt_len_G + torch.zeros(g.num_groups, dtype=torch.long).index_add_(0, g.group_B, seg_len_B)
    L = int(row_len_G.max())
    ids_GL = torch.zeros((g.num_groups, L), dtype=torch.long)
    real_GL = torch.arange(L)[None, :] < row_len_G[:, None]
    pos_GL = torch.zeros((g.num_groups, L), dtype=torch.long)
    segment_GL = torch.full((g.num_groups, L), -2, dtype=torch.long)
    prompt_GL = torch.arange(L)[None, :] < prompt_len_G[:, None]
    P = batch.prompt_ids_BP.shape[1]
    for gi in range(g.num_groups):  # prompts: their real tokens, left-aligned
        p, row = int(prompt_len_G[gi]), int(g.first_row_G[gi])
        ids_GL[gi, :p] = batch.prompt_ids_BP[row, P - p:]
    pos_GL[prompt_GL] = torch.cat([torch.arange(int(p)) for p in prompt_len_G])
    segment_GL[prompt_GL] = -1
    t_S = torch.arange(max(C - 1, 0))
    in_seg_BS = t_S[None, :] < seg_len_B[:, None]  # (B, C-1) completion token t is an input
    row_BS = g.group_B[:, None].expand_as(in_seg_BS)
    col_BS = prompt_len_G[g.group_B][:, None] + seg_start_B[:, None] + t_S[None, :]
    ids_GL[row_BS[in_seg_BS], col_BS[in_seg_BS]] = batch.completion_ids_BC[:, :-1][in_seg_BS]
    pos_GL[row_BS[in_seg_BS], col_BS[in_seg_BS]] = (prompt_len_G[g.group_B][:, None] + t_S[None, :])[in_seg_BS]
    segment_GL[row_BS[in_seg_BS], col_BS[in_seg_BS]] = g.member_B[:, None].expand_as(in_seg_BS)[in_seg_BS]
    # kept columns: n = 0 is the prompt's last column; n = 1 + (segment start) + t is the column of input y_t
    N = 1 + int((row_len_G - prompt_len_G).max())
    keep_GN = torch.zeros((g.num_groups, N), dtype=torch.long)
    keep_GN[:, 0] = prompt_len_G - 1
    n_BS = 1 + seg_start_B[:, None] + t_S[None, :]
    keep_GN[row_BS[in_seg_BS], n_BS[in_seg_BS]] = col_BS[in_seg_BS]
    targets_GN = torch.zeros((g.num_groups, N), dtype=torch.long)
    targets_GN[row_BS[in_seg_BS], n_BS[in_seg_BS]] = batch.completion_ids_BC[:, 1:][in_seg_BS]
    flat_BS = (g.group_B[:, None] * N + n_BS).masked_fill(~in_seg_BS, 0)
    segments = SegmentLayout.build(L, prompt_len_G, g.group_B, col_BS, in_seg_BS) if with_segments else None
    return _Packed(ids_GL, real_GL, pos_GL, segment_GL, keep_GN, targets_GN, flat_BS, segments)


def _exclusive_cumsum_per_group(x_R: torch.Tensor, group_R: torch.Tensor) -> torch.Tensor:
    """For rows sorted by group: the sum of x over the earlier rows of the same group."""
    total_R = torch.cumsum(x_R, 0) - x_R
    first_R = torch.ones_like(group_R, dtype=torch.bool)
    first_R[1:] = group_R[1:] != group_R[:-1]
    start_R = torch.cummax(torch.where(first_R, torch.arange(len(x_R)), 0), 0).values
    return total_R - total_R[start_R]


def _shared_prompt_allowed(real_GL: torch.Tensor, segment_GL: torch.Tensor) -> torch.Tensor:
    """(G, L, L) bool: query q sees key j <= q that is real and lies in the prompt or in q's own segment.
    Every query also sees itself, so padding queries stay finite."""
    L = real_GL.shape[1]
    seg_q, seg_k = segment_GL[:, :, None], segment_GL[:, None, :]
    causal_LL = torch.ones((L, L), dtype=torch.bool, device=real_GL.device).tril()
    allowed_GLL = causal_LL & real_GL[:, None, :] & ((seg_k == -1) | (seg_k == seg_q))
    return allowed_GLL | torch.eye(L, dtype=torch.bool, device=real_GL.device)


def _shared_prompt_masks(model: nn.Module, pk: "_Packed", dtype: torch.dtype) -> torch.Tensor | dict:
    """The shared-prompt layout's attention mask as the model takes it: one mask, or one per layer type
    where some layers attend over a sliding window, counted in positions, not packed columns
    (:func:`seqpg.model.attention_masks.layer_masks`)."""
    allowed_GLL = _shared_prompt_allowed(pk.real_GL, pk.segment_GL)
    return layer_masks(model, allowed_GLL, pk.pos_GL, pk.pos_GL, dtype)


def _shared_prompt_logprobs(model: nn.Module, host: RolloutBatch, g: PromptGroups, temperature: float,
                            with_entropy: bool, with_hidden: bool,
                            device: torch.device | None = None) -> CompletionLogprobs:
    """``host`` and ``g`` on the CPU, where the layout is built; the forward pass runs on ``device``
    (by default the model's)."""
    device = device or model_device(model)
    blocks = segment_attention.applies(model)  # the same attention, by blocks (the dense mask stays as a fallback)
    pk = _pack(host, g, with_segments=blocks).to(device)
    batch, group_B = host.to(device), g.group_B.to(device)
    dtype = next(model.parameters()).dtype
    mask = _shared_prompt_masks(model, pk, dtype)
    kwargs = dict(input_ids=pk.ids_GL, attention_mask=mask, position_ids=pk.pos_GL, logits_to_keep=pk.keep_GN,
                  output_hidden_states=with_hidden, use_cache=False)
    if blocks:
        with segment_attention.use(model):
            out = model(**kwargs, seqpg_segments=pk.segments)
    else:
        out = model(**kwargs)
    logits_GNV = out.logits  # (G, N, V)
    first_B1V = logits_GNV[group_B, :1]  # (B, 1, V) the prompt's last column, once per row
    mask_BS = batch.span_mask_BC[:, 1:]  # columns fed to the model (context inside an episode included)

    def per_row(first_B1: torch.Tensor, kept_GN: torch.Tensor) -> torch.Tensor:
        rest_BS = kept_GN.reshape(-1)[pk.flat_BS].masked_fill(~mask_BS, 0.0)
        return torch.cat([first_B1, rest_BS], dim=1).masked_fill(~batch.completion_mask_BC, 0.0)  # (B, C)

    first_lp_B1, first_h_B1 = _logprobs_entropy(first_B1V, batch.completion_ids_BC[:, :1], temperature, with_entropy)
    kept_lp_GN, kept_h_GN = _logprobs_entropy(logits_GNV, pk.targets_GN, temperature, with_entropy)
    logprobs_BC = per_row(first_lp_B1, kept_lp_GN)
    entropy_BC = per_row(first_h_B1, kept_h_GN) if with_entropy else None
    hidden_BCH = None
    if with_hidden:
        hidden_GNH = torch.take_along_dim(out.hidden_states[-1], pk.keep_GN[..., None], dim=1)  # (G, N, H)
        H = hidden_GNH.shape[-1]
        rest_BSH = hidden_GNH.reshape(-1, H)[pk.flat_BS] * mask_BS[..., None]
        hidden_BCH = torch.cat([hidden_GNH[group_B, :1], rest_BSH], dim=1)
    return CompletionLogprobs(logprobs_BC=logprobs_BC, entropy_BC=entropy_BC, hidden_BCH=hidden_BCH)
