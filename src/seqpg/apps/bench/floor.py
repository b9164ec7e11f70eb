"""The sampling phase's floor: the bytes a decode must read, and the machine's memory bandwidth.

A decode step runs one token per active row against every weight, a few rows per weight read, so
its time cannot fall below the bytes it must read over the memory bandwidth (the roofline's
memory-bound side, Williams et al. 2009, doi:10.1145/1498765.1498785).  Step ``t`` of a generation,
for the rows ``b`` still producing tokens (completion length ``c_b > t``), reads

    bytes(t) = s_m (N_layers + N_head) + s_v N_vec + (s_k + s_v') n_layers H_kv D  sum_b (p_b + t)

* ``N_layers``: the decoder layers' weight matrices (q, k, v, o, MLP); ``N_head``: the LM head's
  (``V x d``, read whole every step even when it is tied to the embedding); ``s_m``: bytes per
  element as the decode reads them (its products' dtype: bf16 under bf16 autocast, each weight
  cast once per sampling call).
* ``N_vec``: the norms' weights and any biases, at their own storage dtype ``s_v``.
* The KV cache of row ``b``: its ``p_b`` real prompt tokens and ``t`` completion tokens before
  step ``t`` (step 0 feeds the prompt's last token, which the step itself writes and attends to);
  ``H_kv`` key/value heads of size ``D`` per layer; ``s_k``, ``s_v'`` bytes per key and per value
  element as the sampler stores them.  Padding is not counted, nor rows that already stopped.

Not counted: the prompt's prefill (one more read of the weights, bounded by arithmetic rather than
bandwidth), the embedding lookup (one row of ``d`` per token), and the writes (the new keys and
values, the logits).  The generation's floor is ``sum_t bytes(t)`` over its ``max_b c_b`` steps,
over the bandwidth :func:`memory_bandwidth` measures (reading arrays far larger than the caches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeShape:
    """What the bytes of a decode step depend on, read from a decoder-only causal LM."""

    layer_matrix_params: int  # N_layers: the decoder layers' weight matrices
    head_params: int  # N_head: the LM head's weight (V x d)
    vector_params: int  # N_vec: norms and biases, layers and the final norm
    n_layers: int
    kv_heads: int  # H_kv
    head_dim: int  # D

    @classmethod
    def of(cls, model: nn.Module) -> "DecodeShape":
        """Read the shape of a Hugging Face causal LM (``model.model.layers``, ``model.lm_head``)."""
        config = model.config.get_text_config(decoder=True)
        trunk, head = model.get_decoder(), model.get_output_embeddings()
        layer_params = [p for layer in trunk.layers for p in layer.parameters()]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(layer_matrix_params=sum(p.numel() for p in layer_params if p.dim() == 2),
                   head_params=head.weight.numel(),
                   vector_params=sum(p.numel() for p in layer_params if p.dim() != 2)
                   + sum(p.numel() for p in trunk.norm.parameters())
                   + (head.bias.numel() if head.bias is not None else 0),
                   n_layers=config.num_hidden_layers,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   head_dim=head_dim)


@dataclass(frozen=True)
class StorageBytes:
    """Bytes per element of what a decode step reads: s_m, s_v, s_k, s_v' (module docstring)."""

    matrix: int
    vector: int
    key: int
    value: int


def decode_step_bytes(shape: DecodeShape, sizes: StorageBytes, kv_lengths: list[int]) -> int:
    """bytes(t): every weight once, plus each active row's keys and values at its length ``kv_lengths[b]``."""
    if any(n < 0 for n in kv_lengths):
        raise ValueError(f"decode_step_bytes: KV lengths must be >= 0, got {kv_lengths}")
    weights = sizes.matrix * (shape.layer_matrix_params + shape.head_params) + sizes.vector * shape.vector_params
    per_position = (sizes.key + sizes.value) * shape.n_layers * shape.kv_heads * shape.head_dim
    return weights + per_position * sum(kv_lengths)


def generation_bytes(shape: DecodeShape, sizes: StorageBytes, prompt_lengths: list[int],
                     completion_lengths: list[int]) -> int:
    """sum_t bytes(t) over a generation's decode steps: row b (prompt p_b, completion c_b) is in steps
    0 .. c_b - 1 and reads p_b + t positions of its cache at step t."""
    if len(prompt_lengths) != len(completion_lengths):
        raise ValueError(f"generation_bytes: {len(prompt_lengths)} prompt lengths for "
                         f"{len(completion_lengths)} completions")
    steps = max(completion_lengths, default=0)
    return sum(decode_step_bytes(shape, sizes, [p + t for p, c in zip(prompt_lengths, completion_lengths) if c > t])
               for t in range(steps))


def sampler_storage(model: nn.Module, autocast_dtype: torch.dtype | None) -> StorageBytes:
    """The bytes per element seqpg's sampler reads for ``model`` (under autocast to ``autocast_dtype``, or
    none): the weight matrices in the products' dtype, the vectors as stored, and the KV cache's keys and
    values as a one-token forward stores them (the sampler's cache keeps the dtypes it is given)."""
    device = model.lm_head.weight.device
    on = autocast_dtype is not None
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=on):
        out = model.get_decoder()(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True)
    cache = next(v for k, v in out.items() if k in ("cache", "past_key_values"))  # named by transformers' version
    layer = cache.layers[0]
    vectors = [p for p in model.parameters() if p.dim() != 2] or [model.lm_head.weight]
    return StorageBytes(matrix=(torch.empty(0, dtype=autocast_dtype) if on else model.lm_head.weight).element_size(),
                        vector=vectors[0].element_size(), key=layer.keys.element_size(),
                        value=layer.values.element_size())


def memory_bandwidth(*, mib: int = 256, repeats: int = 7, device: str = "cpu") -> dict:
    """The best bytes per second of two kernels over float32 arrays of ``mib`` MiB (STREAM's way: far
    larger than the caches, best of ``repeats`` after one unmeasured pass), with torch's current threads.

    ``read``: ``a.sum()``, ``mib`` MiB read.  ``copy``: ``b.copy_(a)``, counted as STREAM counts its
    copy, ``mib`` MiB read plus ``mib`` MiB written.  Returns {"read_bytes_per_s", "copy_bytes_per_s",
    "mib"}; the floor uses ``read_bytes_per_s`` (a decode reads).
    """
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    best = {}
    for name, kernel, nbytes in (("read", a.sum, 4 * n), ("copy", lambda: b.copy_(a), 8 * n)):
        kernel()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            kernel()
            sync()
            times.append(time.perf_counter() - t)
        best[name] = nbytes / min(times)
    return {"read_bytes_per_s": best["read"], "copy_bytes_per_s": best["copy"], "mib": mib}
