"""Model FLOPs of a policy-gradient training step, and the machine's measured matmul peak.

Counting (Kaplan et al. 2020, arXiv:2001.08361, sec. 2.1; the attention term as in PaLM,
Chowdhery et al. 2022, arXiv:2204.02311, app. B).  A linear layer of ``n_in x n_out`` weights
costs ``2 n_in n_out`` FLOPs per token forward and twice that backward (the input's gradient
and the weight's), so one training pass over the real tokens costs

    F_train = 3 F_fwd,
    F_fwd   = 2 N_trunk T_trunk  +  2 d V T_head  +  4 d_attn n_layers A

* ``N_trunk``: weights of the decoder layers' linear maps (attention q, k, v, o and the MLP);
  norms, the embedding lookup and optimizer arithmetic are not counted.
* ``T_trunk``: token positions the decoder layers process, real tokens only (padding is not
  counted, even where a layout computes it).
* ``T_head``: positions whose logits are computed (``d x V`` LM-head matmul each); only the
  columns that predict a completion token, as both libraries compute no others.
* ``A``: (query, visible key) pairs over real tokens; each costs ``2 d_attn`` FLOPs for
  ``q . k`` and ``2 d_attn`` for the weighted sum of values (``d_attn`` = heads x head size).

Two layouts are counted.  ``per_sample_counts``: every sample is its own sequence
``[prompt | completion]`` (what TRL's GRPOTrainer and seqpg's padded layout run).
``shared_prompt_counts``: the prompt is processed once per group and each completion attends
to it (seqpg's shared-prompt layout, :mod:`seqpg.model.policy`), so ``T_trunk`` counts each prompt
once.  Model FLOPs utilisation is ``F_train / (seconds x peak)``, with the peak measured on
this machine by :func:`matmul_peak` (large square ``torch.matmul``, same thread count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a decoder-only transformer."""

    trunk_linear_params: int  # N_trunk: weights of the decoder layers' linear maps
    d_model: int
    d_attn: int  # heads x head size (what q . k and the value sum run over)
    vocab: int
    n_layers: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        """Read the shape of a Hugging Face causal LM (also through PEFT / DDP wrappers)."""
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        config = inner.config
        head = inner.get_output_embeddings()
        n_trunk = sum(m.weight.numel() for m in inner.modules()
                      if isinstance(m, nn.Linear) and m is not head and m.weight.dim() == 2)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(trunk_linear_params=n_trunk, d_model=config.hidden_size,
                   d_attn=config.num_attention_heads * head_dim, vocab=head.weight.shape[0],
                   n_layers=config.num_hidden_layers)


@dataclass(frozen=True)
class TokenCounts:
    """Real-token counts of one training pass (see the module docstring)."""

    trunk: int  # T_trunk
    head: int  # T_head
    attention_pairs: int  # A

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.trunk + other.trunk, self.head + other.head,
                           self.attention_pairs + other.attention_pairs)


def _pairs(first_query: int, n: int) -> int:
    """sum_{t=0}^{n-1} (first_query + t + 1): a causal run of n queries after first_query visible keys."""
    return n * first_query + n * (n + 1) // 2


def per_sample_counts(prompt_lengths: list[int], completion_lengths: list[int]) -> TokenCounts:
    """Every sample run as its own sequence: trunk over prompt + completion, logits for the completion."""
    counts = TokenCounts(0, 0, 0)
    for p, c in zip(prompt_lengths, completion_lengths, strict=True):
        counts += TokenCounts(p + c, c, _pairs(0, p + c))
    return counts


def shared_prompt_counts(group_prompt_lengths: list[int], completion_lengths: list[list[int]]) -> TokenCounts:
    """Each group's prompt once, then each completion's tokens but its last (nothing attends to it).

    The logits are the prompt's last column (once per group) and, per completion of length c,
    the c - 1 columns after its first c - 1 tokens.
    """
    counts = TokenCounts(0, 0, 0)
    for p, lengths in zip(group_prompt_lengths, completion_lengths, strict=True):
        counts += TokenCounts(p, 1, _pairs(0, p))
        for c in lengths:
            counts += TokenCounts(c - 1, c - 1, _pairs(p, c - 1))
    return counts


def train_flops(shape: ModelShape, counts: TokenCounts) -> float:
    """F_train = 3 (2 N_trunk T_trunk + 2 d V T_head + 4 d_attn n_layers A)."""
    forward = (2.0 * shape.trunk_linear_params * counts.trunk + 2.0 * shape.d_model * shape.vocab * counts.head
               + 4.0 * shape.d_attn * shape.n_layers * counts.attention_pairs)
    return 3.0 * forward


def matmul_peak(dtype: torch.dtype, *, sizes: tuple[int, ...] | None = None, repeats: int = 5,
                device: str = "cpu") -> dict:
    """The best FLOP/s of ``a @ b`` for square matrices of the given sizes (median of ``repeats`` each).

    Runs with torch's current thread count (set it first).  Returns {"flops_per_s", "size",
    "per_size": {n: flop/s}, "flops_per_cpu_s"}: FLOPs per wall-clock second, and per second of
    this process's CPU time (all threads), at the best size.  Sizes default to 1024-4096 on the
    CPU and 2048-8192 on a GPU (timed with a device synchronisation around each product).
    """
    cuda = torch.device(device).type == "cuda"
    sizes = sizes or ((2048, 4096, 8192) if cuda else (1024, 2048, 4096))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    per_size, per_cpu = {}, {}
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        wall, cpu = [], []
        for _ in range(repeats):
            sync()
            t, c = time.perf_counter(), time.process_time()
            a @ b
            sync()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        per_size[n] = 2.0 * n ** 3 / sorted(wall)[len(wall) // 2]
        per_cpu[n] = 2.0 * n ** 3 / max(sorted(cpu)[len(cpu) // 2], 1e-9)
    best = max(per_size, key=per_size.get)
    return {"flops_per_s": per_size[best], "size": best, "per_size": per_size, "flops_per_cpu_s": per_cpu[best]}
