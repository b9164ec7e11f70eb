"""A lean one-token decode step for Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3) and Gemma 3.

Profiling ``seqpg.rollout.sampling`` on 2 CPU cores (SmolLM2-135M, 16 rows, 32 tokens) showed that
a decode step through the Hugging Face forward spends more time around its matmuls than in
them: building a 4-D attention mask each step, ``repeat_kv`` copies for grouped-query
attention, the SDPA kernel's set-up for a single query, and ~130 small ops per layer.  This
module runs the same maths with the model's own weights, rotary embedding and activation, and
does the norms, the attention and the matrix products itself, one row per sequence, (B, features)::

    x = rms_norm(h)                                       # h (B, E); norms as the model's RMSNorm
    q, k, v = rope(x W_q^T), rope(x W_k^T), x W_v^T      # (B, H, D), (B, Hkv, D), (B, Hkv, D)
    K[:, :, w], V[:, :, w] = k, v                         # written into the KV cache in place
    a = softmax(q K^T * scale + bias) V                   # grouped: H = Hkv * rep, no copies of K, V
    h = h + a W_o^T;  h = h + (act(x' W_gate^T) * x' W_up^T) W_down^T,  x' = rms_norm(h)

``bias`` is 0 on the columns a row may attend to and -inf elsewhere (left padding, and the
columns after a row stopped).

Gemma 3 (``gemma3_text``) differs in five places, each taken from the model's own modules: the
embedding is scaled by sqrt(E) (its embedding module does it); its RMSNorm multiplies by
(1 + weight) in float32; each sub-block's output is normed before it joins the residual
(``post_attention_layernorm``, and ``pre_``/``post_feedforward_layernorm`` around the MLP); its
layers are of two types with their own rotary bases, and the "sliding_attention" ones see only the
``sliding_window`` most recent real columns (counted over real columns, so a multi-turn cache's
padding inside a row does not shrink the window); the logits may be soft-capped,
``cap * tanh(z / cap)``.  Attention logit soft-capping, which Gemma 3's own forward does not apply,
sends such a config back to that forward.

The products are the decode's cost: 16 rows against weights far larger than the cache.  On CPU
each weight is repacked once per sampling call into oneDNN's blocked layout for that row count
(``torch.ops.mkldnn._reorder_linear_weight``, what torch's inductor does for frozen CPU linears)
and multiplied with ``_linear_pointwise``: MKL's ``sgemm`` at 16 rows reaches 65-80 GFLOP/s, under
half the 186 GFLOP/s fp32 peak, the packed products ~110-130.  On 2 CPU cores (SmolLM2-135M, 16 rows, fp32) the 30
layers' products plus the LM head take 34 ms per token instead of 55 ms (mm, feature-major, the
previous layout) or 67 ms (``F.linear``); repacking all weights costs 0.1-0.25 s per call.  The
q, k and v projections run as one product, and so do gate and up (their weights stacked before
packing): 4 products per layer instead of 7.  Whole sampling call, 2 prompts x 8 samples x 32
tokens, per token step, medians interleaved in one process: fp32 99.9 ms (MKL, feature-major) ->
73.0 ms (packed) -> 65.3 ms (packed, stacked); bf16 56.2 -> 50.0 -> 50.7 ms (the stacking: 53.2 ->
50.7 in its own run).  Under autocast the weights are cast to
its dtype before packing, once per ``FastDecoder``, as autocast's own cast cache would, and each
product runs in that dtype.  Off CPU, where torch lacks oneDNN (ARM builds), and for bf16 where
oneDNN cannot run bf16 on the CPU (x86 without AVX-512 BW/VL/DQ or AVX-NE-CONVERT: torch refuses
to repack a bf16 weight there), the products are ``F.linear`` in the same dtype, same maths
(:func:`can_pack`, from :mod:`seqpg.rollout.cpu_caps`).
``quantize="int8"`` (``sampling.dtype=int8``): each product weight is quantised once per decoder to
int8, symmetric per output channel (scale max|w| / 127), and each step's activations per call
(``torch.ops.quantized.linear_dynamic`` with ``reduce_range``, as fbgemm needs on AVX2, whose 8-bit
multiply-add saturates at full range): a quarter of float32's bytes per weight read, on any x86 CPU.
The norms, rotary embedding, attention and sampling stay float32; the prompt's prefill runs in the
model's own precision.  The products then differ from float32's by the weights' rounding, which the
trainer measures and corrects (:mod:`seqpg.core.mismatch`).
On a CUDA device each step from the second on is replayed from a CUDA graph (``FastDecoder``'s
``graph``): launched one by one from Python, the step's ~600 kernels took ~30 ms per token on an
H200; with the replay a whole sampling call (2 x 8 rows, 32 tokens, fp32) went from 1068 to 288 ms
(docs/bench.md).
The prompt is prefilled by the model's own forward into the same preallocated cache
(:func:`seqpg.rollout.sampling.preallocated_cache`); only the one-token steps take this path.
``supports(model)`` says when it applies; otherwise the sampler keeps the Hugging Face forward.
``tests/test_fastdecode.py`` checks it against that forward, and packed against plain products.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpg.rollout import cpu_caps

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
WINDOWED_TYPES = ("gemma3_text",)
"""Families whose sliding-window layers the decoder runs (the others decode here only without a window)."""
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Gemma3RMSNorm")
"""Norm classes whose maths ``_rms_norm`` repeats (float32 RMS; then Llama's input dtype times the
weight, or Gemma's times (1 + weight) in float32)."""


def supports(model: nn.Module) -> bool:
    """True for a plain Llama-family causal LM: no adapter wrappers, no sharded tensors, no hooks.

    The decoder calls the projections' and the LM head's weights directly, so a forward hook on
    any module (a logits processor on ``lm_head``, an activation probe) sends decoding back
    through the model's own forward, where the hook runs.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return False
    if model_type not in WINDOWED_TYPES and getattr(config, "sliding_window", None) is not None \
            and getattr(config, "use_sliding_window", True):
        return False  # windowed attention outside Gemma 3: leave it to the model's own forward
    if getattr(config, "attn_logit_softcapping", None) is not None or getattr(config, "use_bidirectional_attention",
                                                                               False):
        return False  # attention the step does not repeat (Gemma 3's own forward ignores the soft-cap)
    trunk = getattr(model, "model", None)
    layers = getattr(trunk, "layers", None)
    if layers is None or not hasattr(model, "lm_head") or not hasattr(trunk, "rotary_emb"):
        return False
    if _has_hooks(model) or type(trunk.norm).__name__ not in RMS_NORMS:
        return False
    for layer in layers:
        attn = layer.self_attn
        norms = [layer.input_layernorm, layer.post_attention_layernorm] + [
            getattr(attn, a) for a in ("q_norm", "k_norm") if hasattr(attn, a)] + [
            getattr(layer, a) for a in ("pre_feedforward_layernorm", "post_feedforward_layernorm") if hasattr(layer, a)]
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
    """Forward hooks that could change or observe a decode step.  transformers' output-capturing hooks
    (installed for good by the first forward that asks for hidden states, e.g. a shared critic's) do
    nothing outside that model's own forward call, so they do not count."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_pre_hooks or any(not _inert_capture_hook(h) for h in m._forward_hooks.values())
               for m in model.modules())


def _inert_capture_hook(hook) -> bool:
    """transformers' ``output_capturing_hook``: it records outputs only while the model's own forward has a
    collector active, and returns them unchanged."""
    return getattr(hook, "__qualname__", "").endswith("install_output_capuring_hook.<locals>.output_capturing_hook") \
        and getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def can_pack(device: str, dtype: torch.dtype) -> bool:
    """True where products in ``dtype`` on ``device`` may run on weights prepacked for oneDNN: a CPU,
    a torch with the prepacked linear, and float32, or bf16 where oneDNN runs bf16 on this CPU
    (:mod:`seqpg.rollout.cpu_caps`)."""
    if device != "cpu" or not cpu_caps.onednn_linear():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_caps.onednn_bf16())


class FastDecoder:
    """One-token steps of ``model`` against a preallocated KV cache (``sampling._PreallocatedLayer``s).

    On CPU the weights are repacked once per decoder (one sampling call) into oneDNN's blocked
    layout for the decode's row count (``pack=None``: where :func:`can_pack` says the products'
    dtype may be); elsewhere, or with ``pack=False``, the products are plain ``F.linear``.

    ``graph`` (default: on a CUDA device): from the second step on, the step reads its inputs from
    fixed buffers and writes the new key and value at a position held in a tensor
    (``index_copy_``), attending over the cache's whole capacity with the columns not yet written
    masked out; on CUDA that step is recorded once as a CUDA graph and replayed, one launch per
    token instead of ~20 kernel launches per layer, each with Python around it.  Elsewhere the
    same fixed-buffer step runs eagerly (what the tests compare with the plain step).
    """

    def __init__(self, model: nn.Module, cache, rows: int, pack: bool | None = None,
                 graph: bool | None = None, quantize: str | None = None) -> None:
        self.model, self.trunk = model, model.model
        self.layers = list(self.trunk.layers)[: model.config.num_hidden_layers]
        self.cache_layers = cache.layers
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = model.config.num_attention_heads
        self.n_kv = model.config.num_key_value_heads
        self.scale = attn.scaling
        config = model.config
        # Gemma 3: some layers attend over a sliding window, with their own rotary base ("layer types")
        windowed = config.model_type in WINDOWED_TYPES
        self.layer_types = [config.layer_types[i] if windowed else None for i in range(len(self.layers))]
        self.windows = [layer.self_attn.sliding_window if windowed else None for layer in self.layers]
        self.logit_cap = getattr(config, "final_logit_softcapping", None)
        self.device = model.lm_head.weight.device.type
        self.dtype = torch.get_autocast_dtype(self.device) if torch.is_autocast_enabled(self.device) else None
        self.rows = rows
        if quantize not in (None, "int8"):
            raise ValueError(f"FastDecoder: quantize must be None or 'int8', got {quantize!r}")
        if quantize is not None and (self.device != "cpu" or pack or graph):
            raise ValueError("FastDecoder(quantize='int8') runs on the CPU only (torch's dynamic quantised "
                             "linear), without pack or graph")
        self.int8 = quantize == "int8"
        packable = not self.int8 and can_pack(self.device, self.dtype or model.lm_head.weight.dtype)
        if pack and not packable:
            raise ValueError("FastDecoder(pack=True) needs a CPU model, a torch built with oneDNN (mkldnn) and, for "
                             "bf16, a CPU on which oneDNN runs bf16 (seqpg.rollout.cpu_caps); use pack=None to choose")
        self.pack = packable if pack is None else pack
        self._prepared: dict[tuple[nn.Linear, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.graph = self.device == "cuda" if graph is None else bool(graph)
        self._steps = 0
        self._fixed: dict[str, torch.Tensor] | None = None  # the fixed-buffer step's inputs
        self._cuda_graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: torch.Tensor | None = None

    def _weights(self, mods: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the linears ``mods`` stacked as one (their outputs concatenated), as the
        products take them: in autocast's dtype when it was on at construction, and packed for
        oneDNN when ``self.pack``; prepared once per decoder."""
        if mods not in self._prepared:
            w = torch.cat([m.weight.detach() for m in mods]) if len(mods) > 1 else mods[0].weight.detach()
            b = None
            if any(m.bias is not None for m in mods):
                b = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                               for m in mods])
            if self.int8:
                self._prepared[mods] = (quantize_int8(w, b), None)
                return self._prepared[mods]
            if self.dtype is not None and w.dtype != self.dtype:
                w, b = w.to(self.dtype), None if b is None else b.to(self.dtype)
            if self.pack:
                w = torch.ops.mkldnn._reorder_linear_weight(w, self.rows)
            self._prepared[mods] = (w, b)
        return self._prepared[mods]

    def linear(self, x_BK: torch.Tensor, *mods: nn.Linear) -> torch.Tensor:
        """The linears ``mods`` applied to the rows of x (B, K), outputs side by side: x W^T + b, (B, N)."""
        w, b_N = self._weights(mods)
        if self.int8:  # activations quantised per call (per tensor), products in int8, output float32
            return torch.ops.quantized.linear_dynamic(x_BK.float().contiguous(), w, True)
        x_BK = x_BK.to(w.dtype)
        if self.pack:
            return torch.ops.mkldnn._linear_pointwise(x_BK.contiguous(), w, b_N, "none", [], "")
        return nn.functional.linear(x_BK, w, b_N)

    @torch.no_grad()
    def step(self, input_B1: torch.Tensor, pos_B1: torch.Tensor, attend_BW: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after ``input_B1`` (B, 1) at positions ``pos_B1`` (B, 1).

        ``attend_BW`` (B, W) bool: the cache columns each row attends to, including the new one
        (column W - 1, which this step writes).  Autocast is off inside: the products cast their
        input once (``linear``), and the attention runs in the cache's dtype (float32 under
        autocast) instead of autocast re-casting the whole cache to bf16 for every layer at every step.
        """
        with torch.autocast(self.device, enabled=False):
            first = self._steps == 0
            self._steps += 1
            if not self.graph or first:  # the first step also initialises the cache and prepares the weights
                return self._step(input_B1, pos_B1, attend_BW)
            return self._fixed_step(input_B1, pos_B1, attend_BW)

    def _step(self, input_B1: torch.Tensor, pos_B1: torch.Tensor, attend_BW: torch.Tensor) -> torch.Tensor:
        W = attend_BW.shape[1]

        def write(cl, k_BK1D: torch.Tensor, v_BK1D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            _check_filled(cl, W - 1)
            return cl.update(k_BK1D, v_BK1D)  # written in place; views of the W filled columns

        return self._forward(input_B1, pos_B1, attend_BW, write)

    def _fixed_step(self, input_B1: torch.Tensor, pos_B1: torch.Tensor, attend_BW: torch.Tensor) -> torch.Tensor:
        """The step from fixed buffers (see the class docstring); a CUDA graph's replay on CUDA."""
        B, W = attend_BW.shape
        cl0 = self.cache_layers[0]
        _check_filled(cl0, W - 1)
        if self._fixed is None:
            self._fixed = {"input": input_B1.clone(), "pos": pos_B1.clone(), "t": torch.zeros(1, dtype=torch.long,
                                                                                         device=input_B1.device),
                           "attend": torch.zeros((B, cl0.capacity), dtype=torch.bool, device=attend_BW.device)}
        f = self._fixed
        f["input"].copy_(input_B1)
        f["pos"].copy_(pos_B1)
        f["attend"][:, :W].copy_(attend_BW)  # columns >= W stay False: they are written by later steps
        f["t"].fill_(W - 1)
        for cl in self.cache_layers:
            cl.length = W
        if self.device != "cuda":
            return self._forward_fixed()
        if self._cuda_graph is None:  # run once on a side stream (warm-up, and this step's result), then record
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._forward_fixed()
            torch.cuda.current_stream().wait_stream(side)
            self._cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._cuda_graph):
                self._graph_out = self._forward_fixed()
            return out
        self._cuda_graph.replay()
        return self._graph_out

    def _forward_fixed(self) -> torch.Tensor:
        f = self._fixed

        def write(cl, k_BK1D: torch.Tensor, v_BK1D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cl._keys.index_copy_(2, f["t"], k_BK1D.to(cl._keys.dtype))
            cl._values.index_copy_(2, f["t"], v_BK1D.to(cl._values.dtype))
            return cl._keys, cl._values  # the whole capacity; unwritten columns are masked (and zero)

        return self._forward(f["input"], f["pos"], f["attend"], write)

    def _forward(self, input_B1: torch.Tensor, pos_B1: torch.Tensor, attend_BW: torch.Tensor, write) -> torch.Tensor:
        """The step's maths; ``write(cache_layer, k, v)`` stores the new column and returns the keys and
        values to attend over, (B, Hkv, W, D) each, matching ``attend_BW``'s W columns."""
        B, W = attend_BW.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        rep = H // Hkv
        h_B1E = self.trunk.embed_tokens(input_B1)  # (B, 1, E); Gemma's module scales it by sqrt(E)
        rope = {t: self._rope_tables(h_B1E, pos_B1, t) for t in set(self.layer_types)}  # (B, 1, D) cos, sin
        h_BE = h_B1E[:, 0]  # (B, E)
        biases = {w: _attention_bias(attend_BW, w) for w in set(self.windows)}  # (B, 1, 1, W) each
        for layer, cl, kind, window in zip(self.layers, self.cache_layers, self.layer_types, self.windows):
            attn = layer.self_attn
            cos_B1D, sin_B1D = rope[kind]
            x_BE = _rms_norm(layer.input_layernorm, h_BE)
            q_BN, k_BN, v_BN = self.linear(x_BE, attn.q_proj, attn.k_proj, attn.v_proj).split(
                [H * D, Hkv * D, Hkv * D], dim=-1)  # one product for the three
            q_BHD, k_BKD, v_BKD = q_BN.view(B, H, D), k_BN.view(B, Hkv, D), v_BN.view(B, Hkv, D)
            if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over each head's dimension
                q_BHD, k_BKD = _rms_norm(attn.q_norm, q_BHD), _rms_norm(attn.k_norm, k_BKD)
            q_BHD, k_BKD = _rope(q_BHD, cos_B1D, sin_B1D), _rope(k_BKD, cos_B1D, sin_B1D)
            keys_BKWD, values_BKWD = write(cl, k_BKD.unsqueeze(2), v_BKD.unsqueeze(2))
            q_BKRD = q_BHD.view(B, Hkv, rep, D)
            scores_BKRW = torch.matmul(q_BKRD.to(keys_BKWD.dtype), keys_BKWD.transpose(-1, -2)).float()
            probs_BKRW = torch.softmax(scores_BKRW * self.scale + biases[window], dim=-1).to(values_BKWD.dtype)
            a_BKRD = torch.matmul(probs_BKRW, values_BKWD)
            o_BE = self.linear(a_BKRD.reshape(B, H * D), attn.o_proj)
            mlp = layer.mlp
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: each sub-block's output normed too
                h_BE = h_BE + _rms_norm(layer.post_attention_layernorm, o_BE)
                x_BE = _rms_norm(layer.pre_feedforward_layernorm, h_BE)
            else:
                h_BE = h_BE + o_BE
                x_BE = _rms_norm(layer.post_attention_layernorm, h_BE)
            gate_BI, up_BI = self.linear(x_BE, mlp.gate_proj, mlp.up_proj).split(
                [mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
            m_BE = self.linear(mlp.act_fn(gate_BI) * up_BI, mlp.down_proj)
            if hasattr(layer, "post_feedforward_layernorm"):
                m_BE = _rms_norm(layer.post_feedforward_layernorm, m_BE)
            h_BE = h_BE + m_BE
        logits_BV = self.linear(_rms_norm(self.trunk.norm, h_BE), self.model.lm_head)
        if self.logit_cap is not None:  # Gemma: z -> cap * tanh(z / cap)
            logits_BV = torch.tanh(logits_BV / self.logit_cap) * self.logit_cap
        return logits_BV

    def _rope_tables(self, h_B1E: torch.Tensor, pos_B1: torch.Tensor, kind: str | None):
        """(cos, sin), (B, 1, D) each, of the model's rotary embedding; per layer type where it has several."""
        if kind is None:
            return self.trunk.rotary_emb(h_B1E, pos_B1)
        return self.trunk.rotary_emb(h_B1E, pos_B1, kind)


def quantize_int8(w_NK: torch.Tensor, b_N: torch.Tensor | None):
    """``w`` (N, K) as symmetric int8 per output channel, scale max|w_n| / 127, packed with its float32 bias for
    ``torch.ops.quantized.linear_dynamic`` (fbgemm / x86 engines, AVX2 and up)."""
    import warnings

    w32 = w_NK.float()
    scale_N = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # torch marks its quantised tensor constructors as deprecated
        warnings.simplefilter("ignore")
        q_NK = torch.quantize_per_channel(w32, scale_N, torch.zeros_like(scale_N, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q_NK, None if b_N is None else b_N.float())


def _attention_bias(attend_BW: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, 1, W) float32: 0 on the columns a row attends to, -inf elsewhere.

    ``window``: a sliding-window layer's, which sees only the row's ``window`` most recent real
    columns (the new one included).  Positions count real tokens, so this is the model's window
    ``q - k < window`` over positions, here and wherever a row's cache has masked columns inside it.
    """
    if window is not None:
        recent_BW = attend_BW.flip(-1).long().cumsum(-1).flip(-1) <= window  # real columns from here to the end
        attend_BW = attend_BW & recent_BW
    return torch.zeros(attend_BW.shape, dtype=torch.float32, device=attend_BW.device).masked_fill_(
        ~attend_BW, float("-inf"))[:, None, None, :]


def _check_filled(cache_layer, columns: int) -> None:
    """The step about to run expects ``columns`` cache columns written before it."""
    if cache_layer.get_seq_length() != columns:
        raise RuntimeError(f"FastDecoder: cache holds {cache_layer.get_seq_length()} columns, expected {columns}")


def _rms_norm(norm: nn.Module, x_BF: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm over the last dimension: (..., F) -> same shape.

    As ``LlamaRMSNorm`` (and Qwen2's, Qwen3's, Mistral's): in float32, then the input's dtype, then
    times the weight.  As ``Gemma3RMSNorm``: in float32 times (1 + weight), then the input's dtype.
    """
    x32 = x_BF.float()
    if type(norm).__name__ == "Gemma3RMSNorm":
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
        return (y * (1.0 + norm.weight.float())).to(x_BF.dtype)
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y.to(x_BF.dtype)


def _rope(x_BND: torch.Tensor, cos_B1D: torch.Tensor, sin_B1D: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, heads, D) at each row's position: x cos + rotate_half(x) sin."""
    half = x_BND.shape[-1] // 2
    rotated = torch.cat((-x_BND[..., half:], x_BND[..., :half]), dim=-1)
    return x_BND * cos_B1D + rotated * sin_B1D
