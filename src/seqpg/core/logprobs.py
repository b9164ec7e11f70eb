"""Token log-probabilities and entropies from logits, chunk by chunk, forward and backward.

With x = z / tau (logits z of one position, temperature tau) and p = softmax(x):

    log pi(y) = x_y - logsumexp(x)                      d/dz_k = (1[k = y] - p_k) / tau
    H         = -sum_k p_k log p_k                       d/dz_k = -p_k (log p_k + H) / tau

A language model's logits are (B, T, V) with V = 50k-150k, often in bf16. The textbook
``log_softmax(z.float() / tau).gather(...)`` builds a full (B, T, V) float32 tensor, and autograd
keeps it for the backward pass: twice the logits' memory in bf16. Here both functions are
custom ``torch.autograd.Function``s that visit the rows in chunks of ``chunk_size`` positions,
in float32 (float64 if the logits are float64). The forward keeps only one number per position
(logsumexp, and H for the entropy); the backward recomputes softmax chunk by chunk from the
saved logits and writes the gradient into one buffer of the logits' shape and dtype. Peak
extra memory is thus about one float32 chunk (``chunk_size * V`` numbers) beyond the logits and
their gradient. Logits that cannot be viewed as (B*T, V) without a copy (a slice such as
``logits[:, :-1]``) are visited row by row, never copied whole.

``token_logprobs_and_entropy`` gives both from one pass over the logits (a training step that
logs the entropy needs both): with d = x - max(x), e = exp(d) and s = sum(e),

    log pi(y) = d_y - log s,    H = log s - sum_k e_k d_k / s,

and its backward combines the two gradients in one pass, skipping the entropy's when the
entropy is not differentiated (logged only).

No Function supports double backward (the gradient is not itself differentiable).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_positive, check_rank

DEFAULT_CHUNK_SIZE = 32
"""Positions per chunk: 32 x 49k vocab x 4 bytes = 6.3 MB of float32 scratch (19 MB at 150k), so the
several passes over a chunk hit the CPU's cache, not memory. Measured on 2 CPU cores (AMD EPYC, 32 MB
L3), forward + backward of (1, 512, 49152) float32 logits: 0.315 s at 256 positions, 0.076 s at 32."""


def _blocks(logits_BTV: torch.Tensor, chunk_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, logits_cV): flat position ranges [start, end) of the B*T rows, with their logits (views)."""
    B, T, V = logits_BTV.shape
    try:
        flat_NV = logits_BTV.view(B * T, V)
    except RuntimeError:  # not viewable as rows: walk each sequence
        for b in range(B):
            for t0 in range(0, T, chunk_size):
                t1 = min(t0 + chunk_size, T)
                yield b * T + t0, b * T + t1, logits_BTV[b, t0:t1]
        return
    for s in range(0, B * T, chunk_size):
        e = min(s + chunk_size, B * T)
        yield s, e, flat_NV[s:e]


def _scaled(logits_cV: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """x = z / tau for one chunk, in the compute dtype."""
    x_cV = logits_cV.to(dtype)
    return x_cV if temperature == 1.0 else x_cV / temperature


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _no_autocast(fn):
    """Run a Function's forward/backward with autocast off: the float32 maths must stay float32."""
    def wrapped(ctx, first, *args):
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(ctx, first, *args)
    wrapped.__doc__ = fn.__doc__
    return wrapped


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(z / tau)[y] per position, chunked; backward (onehot(y) - p) * g / tau, chunked."""

    @staticmethod
    @_no_autocast
    def forward(ctx, logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float,
                chunk_size: int) -> torch.Tensor:
        B, T, _ = logits_BTV.shape
        dt = _compute_dtype(logits_BTV)
        tok_N = tokens_BT.reshape(-1)  # (N,) N = B*T
        out_N = torch.empty(B * T, dtype=dt, device=logits_BTV.device)
        lse_N = torch.empty(B * T, dtype=dt, device=logits_BTV.device)
        for s, e, z_cV in _blocks(logits_BTV, chunk_size):
            x_cV = _scaled(z_cV, dt, temperature)
            lse_c = torch.logsumexp(x_cV, dim=-1)  # (c,)
            lse_N[s:e] = lse_c
            out_N[s:e] = x_cV.gather(1, tok_N[s:e, None]).squeeze(1) - lse_c
        ctx.save_for_backward(logits_BTV, tokens_BT, lse_N)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out_N.view(B, T)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_BT: torch.Tensor):
        logits_BTV, tokens_BT, lse_N = ctx.saved_tensors
        tau = ctx.temperature
        B, T, V = logits_BTV.shape
        dt = lse_N.dtype
        g_N = grad_BT.reshape(-1).to(dt) / tau  # (N,)
        tok_N = tokens_BT.reshape(-1)
        grad_BTV = torch.empty((B, T, V), dtype=logits_BTV.dtype, device=logits_BTV.device)
        grad_NV = grad_BTV.view(B * T, V)
        for s, e, z_cV in _blocks(logits_BTV, ctx.chunk_size):
            p_cV = (_scaled(z_cV, dt, tau) - lse_N[s:e, None]).exp_()  # softmax, recomputed
            g_c1 = g_N[s:e, None]
            p_cV.mul_(-g_c1).scatter_add_(1, tok_N[s:e, None], g_c1)  # (onehot - p) * g / tau
            grad_NV[s:e] = p_cV
        return grad_BTV, None, None, None


class _Entropy(torch.autograd.Function):
    """H(softmax(z / tau)) per position, chunked; backward -p (log p + H) * g / tau, chunked."""

    @staticmethod
    @_no_autocast
    def forward(ctx, logits_BTV: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
        B, T, _ = logits_BTV.shape
        dt = _compute_dtype(logits_BTV)
        lse_N = torch.empty(B * T, dtype=dt, device=logits_BTV.device)
        ent_N = torch.empty(B * T, dtype=dt, device=logits_BTV.device)
        for s, e, z_cV in _blocks(logits_BTV, chunk_size):
            x_cV = _scaled(z_cV, dt, temperature)
            lse_c = torch.logsumexp(x_cV, dim=-1)
            logp_cV = x_cV - lse_c[:, None]
            plogp_cV = logp_cV.exp() * logp_cV
            ent_N[s:e] = -torch.where(torch.isneginf(logp_cV), 0, plogp_cV).sum(dim=-1)  # z = -inf: 0 log 0 = 0
            lse_N[s:e] = lse_c
        ctx.save_for_backward(logits_BTV, lse_N, ent_N)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return ent_N.view(B, T)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_BT: torch.Tensor):
        logits_BTV, lse_N, ent_N = ctx.saved_tensors
        tau = ctx.temperature
        B, T, V = logits_BTV.shape
        dt = lse_N.dtype
        g_N = grad_BT.reshape(-1).to(dt) / tau
        grad_BTV = torch.empty((B, T, V), dtype=logits_BTV.dtype, device=logits_BTV.device)
        grad_NV = grad_BTV.view(B * T, V)
        for s, e, z_cV in _blocks(logits_BTV, ctx.chunk_size):
            logp_cV = _scaled(z_cV, dt, tau) - lse_N[s:e, None]
            d_cV = logp_cV.exp() * (logp_cV + ent_N[s:e, None])  # p (log p + H)
            d_cV = torch.where(torch.isneginf(logp_cV), 0, d_cV)
            grad_NV[s:e] = d_cV.mul_(-g_N[s:e, None])
        return grad_BTV, None, None


class _TokenLogprobsAndEntropy(torch.autograd.Function):
    """(log softmax(z / tau)[y], H) per position in one chunked pass; backward in one chunked pass."""

    @staticmethod
    @_no_autocast
    def forward(ctx, logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = logits_BTV.shape
        dt = _compute_dtype(logits_BTV)
        tok_N = tokens_BT.reshape(-1)
        logp_N, ent_N, lse_N = (torch.empty(B * T, dtype=dt, device=logits_BTV.device) for _ in range(3))
        for s, e, z_cV in _blocks(logits_BTV, chunk_size):
            x_cV = _scaled(z_cV, dt, temperature)
            max_c1 = x_cV.amax(dim=-1, keepdim=True)
            d_cV = x_cV - max_c1  # d = x - max x <= 0
            exp_cV = d_cV.exp()
            sum_c = exp_cV.sum(dim=-1)
            log_sum_c = sum_c.log()
            logp_N[s:e] = d_cV.gather(1, tok_N[s:e, None]).squeeze(1) - log_sum_c
            # sum_k e_k d_k: e = 0 where d = -inf (a masked logit); nansum drops its 0 * -inf = nan
            ent_N[s:e] = log_sum_c - exp_cV.mul_(d_cV).nansum(dim=-1) / sum_c
            lse_N[s:e] = max_c1.squeeze(1) + log_sum_c
        ctx.save_for_backward(logits_BTV, tokens_BT, lse_N, ent_N)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp_N.view(B, T), ent_N.view(B, T)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_logp_BT: torch.Tensor | None, grad_ent_BT: torch.Tensor | None):
        logits_BTV, tokens_BT, lse_N, ent_N = ctx.saved_tensors
        tau = ctx.temperature
        B, T, V = logits_BTV.shape
        dt = lse_N.dtype
        zeros_N = torch.zeros(B * T, dtype=dt, device=lse_N.device)
        gl_N = zeros_N if grad_logp_BT is None else grad_logp_BT.reshape(-1).to(dt) / tau
        gh_N = None if grad_ent_BT is None else grad_ent_BT.reshape(-1).to(dt) / tau
        tok_N = tokens_BT.reshape(-1)
        grad_BTV = torch.empty((B, T, V), dtype=logits_BTV.dtype, device=logits_BTV.device)
        grad_NV = grad_BTV.view(B * T, V)
        for s, e, z_cV in _blocks(logits_BTV, ctx.chunk_size):
            logp_cV = _scaled(z_cV, dt, tau) - lse_N[s:e, None]
            gl_c1 = gl_N[s:e, None]
            if gh_N is None:  # (onehot - p) * g_logp
                out_cV = logp_cV.exp_().mul_(-gl_c1)
            else:  # (onehot - p) * g_logp - p (log p + H) * g_H
                p_cV = logp_cV.exp()
                out_cV = logp_cV.add_(ent_N[s:e, None]).mul_(-gh_N[s:e, None]).sub_(gl_c1).mul_(p_cV)
                out_cV = out_cV.nan_to_num_(nan=0.0)  # p = 0 where log p = -inf
            grad_NV[s:e] = out_cV.scatter_add_(1, tok_N[s:e, None], gl_c1)
        return grad_BTV, None, None, None


def _check_logits(logits_BTV: torch.Tensor, temperature: float, chunk_size: int) -> None:
    check_rank("logits_BTV", logits_BTV, 3, "(B, T, V)")
    if not logits_BTV.is_floating_point():
        raise ValueError(f"logits_BTV must be floating point, got {logits_BTV.dtype}")
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python number, not a tensor")
    check_positive("temperature", temperature)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log pi(y_t) = log softmax(z_t / tau)[y_t] for every position. (B, T, V), (B, T) -> (B, T).

    ``logits_BTV[b, t]`` are the logits that predict ``tokens_BT[b, t]`` (already shifted).
    Returns float32 (float64 for float64 logits), differentiable in the logits; at most
    ``chunk_size`` positions are expanded to float32 at a time, forward and backward.
    Every token id must lie in [0, V), padding included (use any real id on padding and mask it).
    """
    _check_tokens(logits_BTV, tokens_BT, temperature, chunk_size)
    return _TokenLogprobs.apply(logits_BTV, tokens_BT.long(), float(temperature), chunk_size)


def _check_tokens(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float, chunk_size: int) -> None:
    _check_logits(logits_BTV, temperature, chunk_size)
    check_rank("tokens_BT", tokens_BT, 2, "(B, T)")
    if tokens_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(f"tokens_BT must have shape (B, T) = {tuple(logits_BTV.shape[:2])} of logits_BTV "
                         f"{tuple(logits_BTV.shape)}, got {tuple(tokens_BT.shape)}")
    if tokens_BT.is_floating_point() or tokens_BT.dtype == torch.bool:
        raise ValueError(f"tokens_BT must hold integer token ids, got dtype {tokens_BT.dtype}")
    V = logits_BTV.shape[2]
    if tokens_BT.numel() and (int(tokens_BT.min()) < 0 or int(tokens_BT.max()) >= V):
        raise ValueError(f"tokens_BT ids must lie in [0, V={V}), got range "
                         f"[{int(tokens_BT.min())}, {int(tokens_BT.max())}]")


def entropy_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0, *,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v with p = softmax(z_t / tau), for every position. (B, T, V) -> (B, T).

    Float32 (float64 for float64 logits), differentiable in the logits (so an entropy bonus
    can be trained), chunked like :func:`token_logprobs`.
    """
    _check_logits(logits_BTV, temperature, chunk_size)
    return _Entropy.apply(logits_BTV, float(temperature), chunk_size)


def token_logprobs_and_entropy(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0, *,
                               chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(``token_logprobs(...)``, ``entropy_from_logits(...)``) from one chunked pass over the logits.

    The same values, dtypes, checks and memory bound as the two functions; about half their
    passes over the (B, T, V) logits forward, and one pass backward for both gradients.
    """
    _check_tokens(logits_BTV, tokens_BT, temperature, chunk_size)
    return _TokenLogprobsAndEntropy.apply(logits_BTV, tokens_BT.long(), float(temperature), chunk_size)
