"""Chunked token_logprobs / entropy_from_logits equal the naive full log-softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from seqpg import entropy_from_logits, token_logprobs
from seqpg.core.logprobs import token_logprobs_and_entropy


def naive_logprobs(logits_BTV, tokens_BT, tau):
    dt = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    logp_BTV = torch.log_softmax(logits_BTV.to(dt) / tau, dim=-1)
    return logp_BTV.gather(-1, tokens_BT[..., None]).squeeze(-1)


def naive_entropy(logits_BTV, tau):
    dt = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    logp_BTV = torch.log_softmax(logits_BTV.to(dt) / tau, dim=-1)
    return -(logp_BTV.exp() * logp_BTV).sum(-1)


def _case(dtype, B=3, T=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)
    return logits, tokens, upstream


def _value_and_grad(fn, logits, upstream):
    x = logits.detach().clone().requires_grad_()
    out = fn(x)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-3),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])  # 4 and 7 do not divide B*T = 15
def test_token_logprobs_equal_naive(dtype, tau, chunk):
    logits, tokens, up = _case(dtype)
    v_ref, g_ref = _value_and_grad(lambda x: naive_logprobs(x, tokens, tau), logits, up)
    v, g = _value_and_grad(lambda x: token_logprobs(x, tokens, tau, chunk_size=chunk), logits, up)
    assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and v.shape == (3, 5)
    assert g.dtype == dtype
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 1.3])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_entropy_equals_naive(dtype, tau, chunk):
    logits, _, up = _case(dtype, seed=1)
    v_ref, g_ref = _value_and_grad(lambda x: naive_entropy(x, tau), logits, up)
    v, g = _value_and_grad(lambda x: entropy_from_logits(x, tau, chunk_size=chunk), logits, up)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, **TOL[dtype])


def test_gradcheck_float64():
    logits, tokens, _ = _case(torch.float64, B=2, T=3, V=4)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, 0.8, chunk_size=2), (x,))
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, 0.8, chunk_size=2), (x,))


@pytest.mark.parametrize("chunk", [2, 3, 100])
def test_non_contiguous_logits_slice(chunk):
    """logits[:, :-1] (the usual shifted slice) cannot be viewed as rows; it is walked row by row."""
    full, _, _ = _case(torch.float32, B=3, T=6, V=9, seed=2)
    tokens = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(3))
    up = torch.randn(3, 5)
    sl = lambda x: x[:, :-1]  # noqa: E731
    v_ref, g_ref = _value_and_grad(lambda x: naive_logprobs(sl(x), tokens, 1.0), full, up)
    v, g = _value_and_grad(lambda x: token_logprobs(sl(x), tokens, chunk_size=chunk), full, up)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(g, g_ref)
    e_ref, ge_ref = _value_and_grad(lambda x: naive_entropy(sl(x), 1.0), full, up)
    e, ge = _value_and_grad(lambda x: entropy_from_logits(sl(x), chunk_size=chunk), full, up)
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(ge, ge_ref)


def test_minus_inf_logits_are_fine():
    """A vocabulary entry masked to -inf has p = 0: finite log-probs of the others, 0 log 0 = 0 in H."""
    logits = torch.tensor([[[0.0, 1.0, -torch.inf]]]).requires_grad_()
    lp = token_logprobs(logits, torch.tensor([[1]]))
    h = entropy_from_logits(logits)
    (lp.sum() + h.sum()).backward()
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(lp, p[1].log().view(1, 1))
    torch.testing.assert_close(h, -(p * p.log()).sum().view(1, 1))
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 2] == 0


class _MaxFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _peak_float32(fn, logits):
    x = logits.detach().clone().requires_grad_()
    with _MaxFloat32() as mode:
        fn(x).sum().backward()
    return mode.max_numel


@pytest.mark.parametrize("fn_name", ["logprobs", "entropy"])
def test_never_builds_full_float32_tensor(fn_name):
    """With bf16 logits, no float32 tensor larger than one chunk (chunk x V) exists, forward or backward."""
    B, T, V, chunk = 4, 16, 512, 8
    logits = torch.randn(B, T, V).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T))
    ours = (lambda x: token_logprobs(x, tokens, 0.9, chunk_size=chunk)) if fn_name == "logprobs" \
        else (lambda x: entropy_from_logits(x, 0.9, chunk_size=chunk))
    naive = (lambda x: naive_logprobs(x, tokens, 0.9)) if fn_name == "logprobs" else (lambda x: naive_entropy(x, 0.9))
    assert _peak_float32(naive, logits) >= B * T * V  # the probe sees the naive full tensor
    assert _peak_float32(ours, logits) <= chunk * V


def test_door_checks():
    logits, tokens, _ = _case(torch.float32)
    with pytest.raises(ValueError, match=r"logits_BTV must have shape \(B, T, V\)"):
        token_logprobs(logits[0], tokens)
    with pytest.raises(ValueError, match="tokens_BT must have shape"):
        token_logprobs(logits, tokens[:, :4])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V=11\)"):
        token_logprobs(logits, tokens + 11)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)
    with pytest.raises(ValueError, match="integer token ids"):
        token_logprobs(logits, tokens.float())


def test_autocast_does_not_change_the_maths():
    logits, tokens, up = _case(torch.bfloat16, seed=4)
    v, g = _value_and_grad(lambda x: token_logprobs(x, tokens, 0.9, chunk_size=4), logits, up)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v2, g2 = _value_and_grad(lambda x: token_logprobs(x, tokens, 0.9, chunk_size=4), logits, up)
        e2 = entropy_from_logits(logits, 0.9)
    assert v2.dtype == torch.float32 and e2.dtype == torch.float32
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(g2, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("which", ["both", "logprobs", "entropy"])
def test_fused_logprobs_and_entropy_equal_the_two_functions(dtype, tau, chunk, which):
    """Values equal the separate functions; the gradient of any mix of the two outputs equals theirs."""
    logits, tokens, up = _case(dtype, seed=5)
    up_h = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    w_lp, w_h = {"both": (1.0, 1.0), "logprobs": (1.0, 0.0), "entropy": (0.0, 1.0)}[which]

    def loss(lp, h):
        out = 0.0
        if w_lp:
            out = out + (lp * up.to(lp.dtype)).sum()
        if w_h:
            out = out + (h * up_h.to(h.dtype)).sum()
        return out

    x_ref = logits.detach().clone().requires_grad_()
    lp_ref, h_ref = token_logprobs(x_ref, tokens, tau), entropy_from_logits(x_ref, tau)
    loss(lp_ref, h_ref).backward()
    x = logits.detach().clone().requires_grad_()
    lp, h = token_logprobs_and_entropy(x, tokens, tau, chunk_size=chunk)
    loss(lp, h).backward()
    assert lp.dtype == lp_ref.dtype and h.dtype == h_ref.dtype and x.grad.dtype == dtype
    torch.testing.assert_close(lp, lp_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])


def test_fused_gradcheck_and_minus_inf():
    logits, tokens, _ = _case(torch.float64, B=2, T=3, V=4)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, tokens, 0.8, chunk_size=2), (x,))
    masked = torch.tensor([[[0.0, 1.0, -torch.inf]]]).requires_grad_()
    lp, h = token_logprobs_and_entropy(masked, torch.tensor([[1]]))
    (lp.sum() + h.sum()).backward()
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(lp, p[1].log().view(1, 1))
    torch.testing.assert_close(h, -(p * p.log()).sum().view(1, 1))
    assert torch.isfinite(masked.grad).all() and masked.grad[0, 0, 2] == 0


def test_fused_never_builds_full_float32_tensor():
    B, T, V, chunk = 4, 16, 512, 8
    logits = torch.randn(B, T, V).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T))
    assert _peak_float32(lambda x: sum(o.sum() for o in token_logprobs_and_entropy(x, tokens, 0.9, chunk_size=chunk)),
                         logits) <= chunk * V
