"""A lean one-token decode step for Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3).

Profiling ``seqpg.sampling`` on 2 CPU cores (SmolLM2-135M, 16 rows, 32 tokens) showed that
a decode step through the Hugging Face forward spends more time around its matmuls than in
them: building a 4-D attention mask each step, ``repeat_kv`` copies for grouped-query
attention, the SDPA kernel's set-up for a single query, and ~130 small ops per layer.  This
module runs the same maths with the model's own weights, rotary embedding and activation, and
does the norms, the attention and the matrix products itself, keeping the step's activations
feature-major, (features, B)::

    x = rms_norm(h)                                       # h (E, B); norms as the model's RMSNorm
    q, k, v = rope(W_q x), rope(W_k x), W_v x            # (H, D, B), (Hkv, D, B), (Hkv, D, B)
    K[:, :, w], V[:, :, w] = k, v                         # written into the KV cache in place
    a = softmax(q K^T * scale + bias) V                   # grouped: H = Hkv * rep, no copies of K, V
    h = h + W_o a;  h = h + W_down(act(W_gate x') * W_up x'),  x' = rms_norm(h)

``bias`` is 0 on the columns a row may attend to and -inf elsewhere (left padding, and the
columns after a row stopped).

Feature-major, each product is ``W @ x`` with the (N, K) weight as the streamed left operand,
which MKL reads at a higher rate than ``x @ W^T`` (2 CPU cores, SmolLM2-135M, B = 16, weights far
larger than the cache: the 30 layers' products 42 ms instead of 50-66 ms per token in fp32), and
no activation needs transposing.  The LM head goes in slices of 4096 vocabulary rows (11 instead
of 18-20 ms per token in fp32).  Whole sampling call, 2 prompts x 8 samples x 32 tokens, fp32:
3.87 s with ``x @ W^T``, 2.85 s now (medians of 7, interleaved in one process); bf16 unchanged
(2.1 s).  Under autocast the weights are cast once per ``FastDecoder`` (one sampling call), as
autocast's own cast cache would, and each product runs in that dtype.  The prompt is prefilled by
the model's own forward into the same preallocated cache (:func:`seqpg.sampling.preallocated_cache`);
only the one-token steps take this path.  ``supports(model)`` says when it applies; otherwise the
sampler keeps the Hugging Face forward.  ``tests/test_fastdecode.py`` checks it against that forward.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""Norm classes whose maths ``_rms_norm`` repeats (float32 RMS, input dtype, times the weight)."""


def supports(model: nn.Module) -> bool:
    """True for a plain Llama-family causal LM: no adapter wrappers, no sharded tensors, no hooks.

    The decoder calls the projections' and the LM head's weights directly, so a forward hook on
    any module (a logits processor on ``lm_head``, an activation probe) sends decoding back
    through the model's own forward, where the hook runs.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False  # windowed attention: leave it to the model's own forward
    trunk = getattr(model, "model", None)
    layers = getattr(trunk, "layers", None)
    if layers is None or not hasattr(model, "lm_head") or not hasattr(trunk, "rotary_emb"):
        return False
    if _has_hooks(model) or type(trunk.norm).__name__ not in RMS_NORMS:
        return False
    for layer in layers:
        attn = layer.self_attn
        norms = [layer.input_layernorm, layer.post_attention_layernorm] + [
            getattr(attn, a) for a in ("q_norm", "k_norm") if hasattr(attn, a)]
        if any(type(n).__name__ not in RMS_NORMS for n in norms):
            return False
        mlp = layer.mlp
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return False
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if type(proj) is not nn.Linear or type(proj.weight) is not nn.Parameter:
                return False  # LoRA-wrapped or sharded (DTensor) projections
    return type(model.lm_head) is nn.Linear and type(model.lm_head.weight) is nn.Parameter


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class FastDecoder:
    """One-token steps of ``model`` against a preallocated KV cache (``sampling._PreallocatedLayer``s)."""

    def __init__(self, model: nn.Module, cache) -> None:
        self.model, self.trunk = model, model.model
        self.layers = list(self.trunk.layers)[: model.config.num_hidden_layers]
        self.cache_layers = cache.layers
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = model.config.num_attention_heads
        self.n_kv = model.config.num_key_value_heads
        self.scale = attn.scaling
        self.device = model.lm_head.weight.device.type
        self.dtype = torch.get_autocast_dtype(self.device) if torch.is_autocast_enabled(self.device) else None
        self._cast: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _weights(self, m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of ``m`` in the dtype the products run in; cast once per decoder."""
        if self.dtype is None or m.weight.dtype == self.dtype:
            return m.weight, m.bias
        if m not in self._cast:
            self._cast[m] = (m.weight.to(self.dtype), None if m.bias is None else m.bias.to(self.dtype))
        return self._cast[m]

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """x in the products' dtype (autocast's, when it was on at construction)."""
        return x if self.dtype is None else x.to(self.dtype)

    def linear(self, m: nn.Linear, x_KB: torch.Tensor) -> torch.Tensor:
        """``m`` applied to the columns of x (K, B): W @ x + b, (N, B) (see the module docstring)."""
        w_NK, b_N = self._weights(m)
        y_NB = torch.mm(w_NK, x_KB.to(w_NK.dtype))
        return y_NB if b_N is None else y_NB + b_N[:, None]

    def head(self, x_KB: torch.Tensor, rows: int = 4096) -> torch.Tensor:
        """LM-head logits (B, V) of the columns of x (K, B), in slices of ``rows`` vocabulary rows."""
        w_VK, b_V = self._weights(self.model.lm_head)
        x_KB = x_KB.to(w_VK.dtype)
        out_VB = torch.empty((w_VK.shape[0], x_KB.shape[1]), dtype=w_VK.dtype, device=w_VK.device)
        for lo in range(0, w_VK.shape[0], rows):
            torch.mm(w_VK[lo:lo + rows], x_KB, out=out_VB[lo:lo + rows])
        logits_BV = out_VB.t().contiguous()
        return logits_BV if b_V is None else logits_BV + b_V

    @torch.no_grad()
    def step(self, input_B1: torch.Tensor, pos_B1: torch.Tensor, attend_BW: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after ``input_B1`` (B, 1) at positions ``pos_B1`` (B, 1).

        ``attend_BW`` (B, W) bool: the cache columns each row attends to, including the new one
        (column W - 1, which this step writes).  Inside, activations are feature-major, (E, B).
        Autocast is off inside: the products cast their input once (``linear``), and the
        attention runs in the cache's dtype (float32 under autocast) instead of autocast
        re-casting the whole cache to bf16 for every layer at every step.
        """
        with torch.autocast(self.device, enabled=False):
            return self._step(input_B1, pos_B1, attend_BW)

    def _step(self, input_B1: torch.Tensor, pos_B1: torch.Tensor, attend_BW: torch.Tensor) -> torch.Tensor:
        B, W = attend_BW.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        rep = H // Hkv
        h_B1E = self.trunk.embed_tokens(input_B1)  # (B, 1, E)
        cos_B1D, sin_B1D = self.trunk.rotary_emb(h_B1E, pos_B1)  # (B, 1, D) each
        cos_DB, sin_DB = cos_B1D[:, 0].t(), sin_B1D[:, 0].t()
        h_EB = h_B1E[:, 0].t().contiguous()  # (E, B)
        bias_B11W = torch.zeros((B, 1, 1, W), dtype=torch.float32).masked_fill_(~attend_BW[:, None, None, :],
                                                                              float("-inf"))
        for layer, cl in zip(self.layers, self.cache_layers):
            attn = layer.self_attn
            x_EB = self.cast(_rms_norm(layer.input_layernorm, h_EB))  # cast once for q, k, v
            q_HDB = self.linear(attn.q_proj, x_EB).view(H, D, B)
            k_KDB = self.linear(attn.k_proj, x_EB).view(Hkv, D, B)
            v_KDB = self.linear(attn.v_proj, x_EB).view(Hkv, D, B)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's dimension
                q_HDB, k_KDB = _rms_norm(attn.q_norm, q_HDB), _rms_norm(attn.k_norm, k_KDB)
            q_HDB, k_KDB = _rope(q_HDB, cos_DB, sin_DB), _rope(k_KDB, cos_DB, sin_DB)
            if cl.get_seq_length() != W - 1:
                raise RuntimeError(f"FastDecoder: cache holds {cl.get_seq_length()} columns, expected {W - 1}")
            keys_BKWD, values_BKWD = cl.update(k_KDB.permute(2, 0, 1).unsqueeze(2),
                                               v_KDB.permute(2, 0, 1).unsqueeze(2))  # written in place
            q_BKRD = q_HDB.permute(2, 0, 1).reshape(B, Hkv, rep, D)
            scores_BKRW = torch.matmul(q_BKRD.to(keys_BKWD.dtype), keys_BKWD.transpose(-1, -2)).float()
            probs_BKRW = torch.softmax(scores_BKRW * self.scale + bias_B11W, dim=-1).to(values_BKWD.dtype)
            a_BKRD = torch.matmul(probs_BKRW, values_BKWD)
            h_EB = h_EB + self.linear(attn.o_proj, a_BKRD.reshape(B, H * D).t())
            mlp, x_EB = layer.mlp, self.cast(_rms_norm(layer.post_attention_layernorm, h_EB))
            gated_IB = mlp.act_fn(self.linear(mlp.gate_proj, x_EB)) * self.linear(mlp.up_proj, x_EB)
            h_EB = h_EB + self.linear(mlp.down_proj, gated_IB)
        return self.head(_rms_norm(self.trunk.norm, h_EB))


def _rms_norm(norm: nn.Module, x_FB: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm over the feature dimension of a feature-major x: (..., F, B) -> same shape.

    As ``LlamaRMSNorm`` (and Qwen2's, Qwen3's, Mistral's): in float32, then the input's dtype, then
    times the weight.
    """
    x32 = x_FB.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-2, keepdim=True) + norm.variance_epsilon)
    return norm.weight[:, None] * y.to(x_FB.dtype)


def _rope(x_NDB: torch.Tensor, cos_DB: torch.Tensor, sin_DB: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of feature-major (heads, D, B) at each row's position: x cos + rotate_half(x) sin."""
    half = x_NDB.shape[1] // 2
    rotated = torch.cat((-x_NDB[:, half:], x_NDB[:, :half]), dim=1)
    return x_NDB * cos_DB + rotated * sin_DB
