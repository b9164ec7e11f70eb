"""Test helpers for the maths core: an enumerable autoregressive policy, and simulated processes.

``ToyLM``: vocabulary {0, 1, 2}, token 2 is EOS, at most T = 3 tokens. A tabular policy has one
row of logits per non-terminal prefix (7 states: "", 0, 1, 00, 01, 10, 11), so the 15 possible
sequences (lengths 1-3, truncated at 3) can be enumerated and E[R], grad E[R] and the state
values V(prefix) computed exactly.

``ThreadGroup``: ``world`` threads that each call ``all_reduce(t)``; it returns the sum over
threads, like ``torch.distributed.all_reduce`` with SUM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from seqpg import token_logprobs

V, EOS, T = 3, 2, 3


def _enumerate() -> tuple[list[list[int]], dict[tuple[int, ...], int]]:
    seqs: list[list[int]] = []
    states: dict[tuple[int, ...], int] = {}

    def rec(prefix: list[int]) -> None:
        if len(prefix) == T or (prefix and prefix[-1] == EOS):
            seqs.append(prefix)
            return
        states.setdefault(tuple(prefix), len(states))
        for v in range(V):
            rec(prefix + [v])

    rec([])
    return seqs, states


@dataclass
class ToyLM:
    """All sequences of the toy language, as padded (S, T) tensors, and their rewards."""

    tokens_ST: torch.Tensor  # (S, T) long, 0 on padding
    mask_ST: torch.Tensor  # (S, T) bool
    state_ST: torch.Tensor  # (S, T) long, index of the prefix y_<t (0 on padding)
    token_rewards_ST: torch.Tensor  # (S, T) float64 per-token rewards (0 on padding); dense ones causal
    n_states: int

    @classmethod
    def make(cls, seed: int = 0, dense: bool = False) -> "ToyLM":
        seqs, states = _enumerate()
        S = len(seqs)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.zeros(S, T, dtype=torch.long)
        mask = torch.zeros(S, T, dtype=torch.bool)
        state = torch.zeros(S, T, dtype=torch.long)
        for i, y in enumerate(seqs):
            tokens[i, : len(y)] = torch.tensor(y)
            mask[i, : len(y)] = True
            state[i, : len(y)] = torch.tensor([states[tuple(y[:t])] for t in range(len(y))])
        final = torch.rand(S, generator=g, dtype=torch.float64) * 3 - 1  # sequence reward in [-1, 2]
        rewards = torch.zeros(S, T, dtype=torch.float64)
        rewards[torch.arange(S), mask.sum(1) - 1] = final
        if dense:  # r_t = table[y_<t, y_t]: causal, a function of y_<=t only
            table = torch.rand(len(states), V, generator=g, dtype=torch.float64) - 0.5
            rewards = rewards + torch.where(mask, table[state, tokens], 0)
        return cls(tokens, mask, state, rewards, len(states))

    @property
    def returns_S(self) -> torch.Tensor:
        return self.token_rewards_ST.sum(1)

    def init_theta(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.n_states, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def logits(self, theta_KV: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        state = self.state_ST if idx is None else self.state_ST[idx]
        return theta_KV[state]  # (n, T, V)

    def token_logprobs(self, theta_KV: torch.Tensor) -> torch.Tensor:
        """(S, T) log pi(y_t | y_<t) of every sequence, 0 on padding."""
        return torch.where(self.mask_ST, token_logprobs(self.logits(theta_KV), self.tokens_ST), 0)

    def probs(self, theta_KV: torch.Tensor) -> torch.Tensor:
        """(S,) probability of each whole sequence; sums to 1."""
        return self.token_logprobs(theta_KV).sum(1).exp()

    def expected_return(self, theta_KV: torch.Tensor) -> torch.Tensor:
        return (self.probs(theta_KV) * self.returns_S).sum()

    def exact_grad(self, theta_KV: torch.Tensor) -> torch.Tensor:
        th = theta_KV.detach().clone().requires_grad_()
        self.expected_return(th).backward()
        return th.grad.flatten()

    def state_values(self, theta_KV: torch.Tensor) -> torch.Tensor:
        """(K,) V(s) = E[sum_{k >= |s|} r_k | prefix s] exactly."""
        lp_ST = self.token_logprobs(theta_KV.detach())
        p_future_ST = lp_ST.flip(1).cumsum(1).flip(1).exp()  # P(y_{>=t} | y_<t)
        G_ST = self.token_rewards_ST.flip(1).cumsum(1).flip(1)
        contrib = torch.where(self.mask_ST, p_future_ST * G_ST, 0)
        return torch.zeros(self.n_states, dtype=torch.float64).index_add_(0, self.state_ST[self.mask_ST],
                                                                           contrib[self.mask_ST])

    def greedy_index(self, theta_KV: torch.Tensor) -> int:
        """The sequence greedy decoding produces (argmax at every step)."""
        _, states = _enumerate()
        prefix: list[int] = []
        while len(prefix) < T and not (prefix and prefix[-1] == EOS):
            prefix.append(int(theta_KV[states[tuple(prefix)]].argmax()))
        seqs, _ = _enumerate()
        return seqs.index(prefix)

    def sample(self, theta_KV: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """(n,) iid sequence indices drawn from the policy."""
        g = torch.Generator().manual_seed(seed)
        return torch.multinomial(self.probs(theta_KV.detach()), n, replacement=True, generator=g)

    def per_row_grads(self, grad_logits_nTV: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(n, K*V): each row's share of d loss / d theta, from the gradient w.r.t. its logits."""
        onehot_nTK = torch.nn.functional.one_hot(self.state_ST[idx], self.n_states).to(grad_logits_nTV.dtype)
        onehot_nTK = onehot_nTK * self.mask_ST[idx][..., None]
        return torch.einsum("ntv,ntk->nkv", grad_logits_nTV, onehot_nTK).flatten(1)


class ThreadGroup:
    """Simulated processes: ``run(fn)`` calls ``fn(rank, all_reduce)`` in ``world`` threads."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self._barrier = threading.Barrier(world)
        self._slots: list[torch.Tensor | None] = [None] * world
        self.calls = 0

    def _all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self._slots[rank] = t.detach().clone()
        self._barrier.wait()
        total = sum(self._slots[1:], self._slots[0].clone())
        if rank == 0:
            self.calls += 1
        self._barrier.wait()
        return total

    def run(self, fn: Callable[[int, Callable], object]) -> list[object]:
        results: list[object] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, lambda t: self._all_reduce(rank, t))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        if errors:
            raise errors[0]
        return results
