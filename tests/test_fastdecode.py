"""The lean decode step (seqpg.rollout.fastdecode) against the model's own forward, and the categorical sampler."""

from __future__ import annotations

import pytest
import torch
import transformers

from seqpg.rollout import cpu_caps, fastdecode
from seqpg.batch import Prompt
from seqpg.rollout.fastdecode import supports
from seqpg.model.policy import completion_logprobs
from seqpg.rollout.sampling import generate, sample_categorical

PROMPTS = [Prompt("a", "x"), Prompt("b", "What is 12 + 7? Answer briefly."), Prompt("c", "hello there")]


def tiny(arch: str, vocab: int, **extra) -> transformers.PreTrainedModel:
    """A seeded 2-layer decoder of family ``arch`` with grouped-query attention (4 heads, 2 KV heads)."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None, **extra)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](**common)).float().eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so that skipping one would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


ARCHS = [("llama", {}), ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
         ("qwen2", {}), ("qwen3", {"head_dim": 8}), ("mistral", {"sliding_window": None})]


@pytest.mark.parametrize("arch,extra", ARCHS, ids=[f"{a}{'-' + next(iter(e)) if e else ''}" for a, e in ARCHS])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_decode_equals_the_models_forward(tiny_tokenizer, arch, extra, temperature):
    """Same draws, same tokens, same log-probs (to float rounding) as decoding through the model's forward."""
    model = tiny(arch, len(tiny_tokenizer), **extra)
    assert supports(model)
    kw = dict(n=3, max_new_tokens=12, temperature=temperature)
    fast = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    slow = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(1), fast_decode=False,
                    **kw)
    assert torch.equal(fast.completion_ids_BC, slow.completion_ids_BC)
    assert torch.equal(fast.completion_mask_BC, slow.completion_mask_BC)
    torch.testing.assert_close(fast.sample_logprobs_BC, slow.sample_logprobs_BC, atol=1e-5, rtol=0)
    # and they are the training-time log-probs of the same tokens (full recomputation, no cache)
    train = completion_logprobs(model, fast, temperature=temperature).logprobs_BC
    torch.testing.assert_close(fast.sample_logprobs_BC, train * fast.completion_mask_BC, atol=1e-5, rtol=0)


@pytest.mark.skipif(not cpu_caps.onednn_linear(), reason="this torch has no oneDNN prepacked linear")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biased q, k, v projections
def test_onednn_packed_products_equal_plain_products(tiny_tokenizer, monkeypatch, arch):
    """The CPU default (weights prepacked for oneDNN) against the fallback where torch has no oneDNN
    (plain ``F.linear``): same draws and tokens."""
    model = tiny(arch, len(tiny_tokenizer))
    kw = dict(n=3, max_new_tokens=12, temperature=1.0)
    packed = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    monkeypatch.setattr(cpu_caps, "onednn_linear", lambda: False)
    assert not fastdecode.FastDecoder(model, transformers.DynamicCache(), rows=2).pack
    plain = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(packed.completion_ids_BC, plain.completion_ids_BC)
    torch.testing.assert_close(packed.sample_logprobs_BC, plain.sample_logprobs_BC, atol=1e-5, rtol=0)


BF16_REFUSAL = ("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, "
                "avx512vl and avx512dq")


def refuse_bf16_repacking(monkeypatch) -> list[torch.dtype]:
    """Make oneDNN's repacking behave as on a CPU without oneDNN bf16 (the error torch raises there);
    returns the dtypes it is called with."""
    if not cpu_caps.onednn_linear():
        pytest.skip("this torch has no oneDNN prepacked linear")
    real, seen = torch.ops.mkldnn._reorder_linear_weight, []

    def reorder(w, *args):
        seen.append(w.dtype)
        if w.dtype == torch.bfloat16:
            raise RuntimeError(BF16_REFUSAL)
        return real(w, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    return seen


def bf16_greedy(model, tokenizer, **kw):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=8, greedy=True, **kw)


def test_bf16_decoding_repacks_nothing_in_bf16_where_onednn_cannot_run_bf16(tiny_tokenizer, monkeypatch):
    """The bug a CPU with AVX2 but no AVX-512 hit: the decoder repacked bf16 weights and torch refused.
    With oneDNN bf16 unsupported the bf16 products run unpacked, and equal the packed ones."""
    model = tiny("llama", len(tiny_tokenizer))
    seen = refuse_bf16_repacking(monkeypatch)
    if cpu_caps.onednn_bf16():  # where the CPU has it, the packed path is taken, and the stand-in refuses it
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            bf16_greedy(model, tiny_tokenizer)
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", torch.ops.mkldnn._reorder_linear_weight)
    monkeypatch.setattr(cpu_caps, "onednn_bf16", lambda: False)
    seen.clear()
    plain = bf16_greedy(model, tiny_tokenizer)
    assert torch.bfloat16 not in seen
    monkeypatch.undo()
    if cpu_caps.onednn_bf16():
        packed = bf16_greedy(model, tiny_tokenizer)
        assert torch.equal(plain.completion_ids_BC, packed.completion_ids_BC)
        torch.testing.assert_close(plain.sample_logprobs_BC, packed.sample_logprobs_BC, atol=1e-2, rtol=0)


def test_bf16_weights_are_packed_only_where_onednn_runs_bf16(tiny_tokenizer, monkeypatch):
    """A model whose weights are bf16 (model.dtype=bfloat16), no autocast: the same choice."""
    model = tiny("llama", len(tiny_tokenizer)).to(torch.bfloat16)
    monkeypatch.setattr(cpu_caps, "onednn_bf16", lambda: False)
    assert not fastdecode.FastDecoder(model, transformers.DynamicCache(), rows=2).pack
    with pytest.raises(ValueError, match="bf16"):
        fastdecode.FastDecoder(model, transformers.DynamicCache(), rows=2, pack=True)
    refuse_bf16_repacking(monkeypatch)
    fast = generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=6, greedy=True)
    slow = generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=6, greedy=True, fast_decode=False)
    assert torch.equal(fast.completion_ids_BC[:, 0], slow.completion_ids_BC[:, 0])
    torch.testing.assert_close(fast.sample_logprobs_BC[:, 0], slow.sample_logprobs_BC[:, 0], atol=3e-2, rtol=0)


@pytest.mark.parametrize("arch,extra", ARCHS[:1] + ARCHS[2:4], ids=["llama", "qwen2", "qwen3"])
def test_the_fixed_buffer_step_of_the_cuda_graph_equals_the_plain_step(tiny_tokenizer, monkeypatch, arch, extra):
    """The step a CUDA graph records (inputs in fixed buffers, the new column written at a position held
    in a tensor, attention over the whole capacity with unwritten columns masked), run eagerly here:
    the same draws, tokens and log-probs as the plain step, also for rows that stop early."""
    from functools import partial

    from seqpg.rollout import sampling

    model = tiny(arch, len(tiny_tokenizer), **extra)
    kw = dict(n=3, max_new_tokens=14, temperature=1.0, stop_strings=("e", "7"))  # some rows stop, some run on
    plain = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(sampling, "FastDecoder", partial(fastdecode.FastDecoder, graph=True))
    fixed = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    assert (~plain.finished_B).any() and plain.finished_B.any()  # both kinds of row are exercised
    assert torch.equal(plain.completion_ids_BC, fixed.completion_ids_BC)
    torch.testing.assert_close(plain.sample_logprobs_BC, fixed.sample_logprobs_BC, atol=1e-5, rtol=0)


def test_packing_is_refused_where_it_cannot_run(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(cpu_caps, "onednn_linear", lambda: False)
    model = tiny("llama", len(tiny_tokenizer))
    with pytest.raises(ValueError, match="oneDNN"):
        fastdecode.FastDecoder(model, transformers.DynamicCache(), rows=2, pack=True)


@pytest.mark.parametrize("caps", ["detected", "none"])  # none: the path of a CPU without oneDNN or its bf16
def test_fast_decode_under_bf16_autocast_stays_close(tiny_tokenizer, monkeypatch, caps):
    model = tiny("llama", len(tiny_tokenizer))
    if caps == "none":
        monkeypatch.setenv(cpu_caps.ENV, "none")
    fast = bf16_greedy(model, tiny_tokenizer)
    slow = bf16_greedy(model, tiny_tokenizer, fast_decode=False)
    same = fast.completion_ids_BC == slow.completion_ids_BC
    assert same[:, 0].all()  # the first step sees identical inputs; later ones may part on bf16 ties
    torch.testing.assert_close(fast.sample_logprobs_BC[:, 0], slow.sample_logprobs_BC[:, 0], atol=3e-2, rtol=0)


def test_supports_only_plain_llama_family(tiny_tokenizer):
    V = len(tiny_tokenizer)
    assert supports(tiny("llama", V))
    assert not supports(tiny("mistral", V, sliding_window=4))  # windowed attention: the model's own forward
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2))
    assert not supports(gpt2)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny("llama", V), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not supports(lora)
    assert not supports(lora.base_model.model)  # its projections are LoRA wrappers, not nn.Linear
    other_norm = tiny("llama", V)
    other_norm.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(32)  # not the RMSNorm it repeats
    assert not supports(other_norm)


def test_a_forward_hook_sends_decoding_through_the_models_forward(tiny_tokenizer):
    """The lean step bypasses module calls, so a hook (here a logits bias on the LM head) must
    turn it off, and the hook must then shape every draw."""
    model = tiny("llama", len(tiny_tokenizer))
    eos = tiny_tokenizer.eos_token_id
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out.index_fill(-1, torch.tensor([eos]), 50.0))
    assert not supports(model)
    batch = generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=6)
    assert (batch.completion_ids_BC[:, 0] == eos).all() and batch.finished_B.all()
    handle.remove()
    assert supports(model)
    pre = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, _a: None)
    assert not supports(model)
    pre.remove()


def test_fallback_models_still_sample(tiny_tokenizer):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1,
                                                                n_head=2, eos_token_id=2, pad_token_id=0)).eval()
    out = generate(gpt2, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    train = completion_logprobs(gpt2, out).logprobs_BC
    torch.testing.assert_close(out.sample_logprobs_BC, train * out.completion_mask_BC, atol=1e-5, rtol=0)


def test_sample_categorical_draws_the_given_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 40_000
    draws = sample_categorical(probs.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert (freq[probs == 0] == 0).all()  # a zero-probability entry is never drawn
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), freq
    one_hot = torch.zeros(3, 7)
    one_hot[torch.arange(3), torch.tensor([0, 6, 3])] = 1.0
    assert sample_categorical(one_hot).tolist() == [0, 6, 3]  # the first and the last entry are reachable


def test_sample_categorical_is_seeded():
    probs = torch.softmax(torch.randn(8, 1000), dim=-1)
    a = sample_categorical(probs, torch.Generator().manual_seed(3))
    b = sample_categorical(probs, torch.Generator().manual_seed(3))
    c = sample_categorical(probs, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fast_decode_of_one_token_prompts_starts_an_empty_cache(tiny_tokenizer):
    """No prefill (the prompt is one token): the first decode step initialises the cache."""
    model = tiny("llama", len(tiny_tokenizer))
    kw = dict(n=2, max_new_tokens=5, chat_template=False)
    fast = generate(model, tiny_tokenizer, [Prompt("a", "x")], generator=torch.Generator().manual_seed(0), **kw)
    slow = generate(model, tiny_tokenizer, [Prompt("a", "x")], generator=torch.Generator().manual_seed(0),
                    fast_decode=False, **kw)
    assert fast.prompt_ids_BP.shape == (2, 1)
    assert torch.equal(fast.completion_ids_BC, slow.completion_ids_BC)
    torch.testing.assert_close(fast.sample_logprobs_BC, slow.sample_logprobs_BC, atol=1e-5, rtol=0)


def test_hidden_state_capture_hooks_left_by_a_shared_critic_keep_the_fast_path():
    """A forward with ``output_hidden_states`` (the shared critic's) leaves transformers' capture hooks on the
    model; they are inert outside that forward, so decoding stays on the fast path and gives the same tokens."""
    from seqpg.batch import Prompt
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
    from seqpg.model.policy import completion_logprobs
    from seqpg.rollout import fastdecode
    from seqpg.rollout.sampling import generate

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3)
    prompts = [Prompt("cat", "cat"), Prompt("dog", "dog")]
    kw = dict(n=3, max_new_tokens=5, chat_template=False)
    before = generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    completion_logprobs(model, before, with_hidden=True)
    assert any(m._forward_hooks for m in model.modules())  # the capture hooks are there now
    assert fastdecode.supports(model)
    again = generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(again.completion_ids_BC, before.completion_ids_BC)
    model.lm_head.register_forward_hook(lambda mod, args, out: out)  # a hook of the user's still counts
    assert not fastdecode.supports(model)


def eos_prone(model: transformers.PreTrainedModel, eos_id: int, bonus: float = 2.5) -> transformers.PreTrainedModel:
    """The LM head given a bias of ``bonus`` on EOS (a plain linear, so the fast decoder still applies)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()[eos_id] = bonus
    model.lm_head = head
    return model


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=20),
                                dict(temperature=1.0, stop_strings=("e",))], ids=["T1", "T0.7-top", "stop"])
def test_rows_that_stopped_leave_the_decode_batch_and_change_nothing(tiny_tokenizer, monkeypatch, kw):
    """Rows leave (down to two), yet the rollout is bit for bit the one decoded with every row to the end:
    the same uniform draw per rollout row and step, and each row's logits independent of the others."""
    from seqpg.rollout import sampling

    model = eos_prone(tiny("llama", len(tiny_tokenizer)), tiny_tokenizer.eos_token_id)
    assert supports(model)
    seen: list[int] = []
    step = fastdecode.FastDecoder.step
    monkeypatch.setattr(fastdecode.FastDecoder, "step", lambda self, x, *a: seen.append(x.shape[0]) or step(self, x, *a))

    def run():
        seen.clear()
        out = generate(model, tiny_tokenizer, PROMPTS, n=4, max_new_tokens=24,
                       generator=torch.Generator().manual_seed(3), **kw)
        return out, list(seen)

    left, rows_left = run()
    with monkeypatch.context() as m:
        m.setattr(sampling, "_keep", lambda *a, **k: None)
        full, rows_full = run()
    assert set(rows_full) == {12} and rows_left[0] == 12
    assert min(rows_left) < 12 and min(rows_left) >= 2, rows_left  # rows did leave, never below two
    assert rows_left == sorted(rows_left, reverse=True)
    assert torch.equal(left.completion_ids_BC, full.completion_ids_BC)
    assert torch.equal(left.completion_mask_BC, full.completion_mask_BC)
    assert torch.equal(left.sample_logprobs_BC, full.sample_logprobs_BC)
    assert torch.equal(left.finished_B, full.finished_B) and left.completions == full.completions


def test_which_rows_leave():
    from seqpg.rollout.sampling import _keep

    f = torch.tensor
    assert _keep(f([False, False, False, False]), steps_left=10) is None  # none stopped
    assert torch.equal(_keep(f([False, True, False, True]), steps_left=10), f([0, 2]))
    assert torch.equal(_keep(f([True, True, False, True]), steps_left=10), f([0, 2]))  # two rows stay
    assert _keep(f([True, False]), steps_left=10) is None  # already two
    assert _keep(f([True] + [False] * 15), steps_left=3) is None  # 1 x 3 x 4 < 16: not worth moving the cache
    assert torch.equal(_keep(f([True] + [False] * 15), steps_left=4), torch.arange(1, 16))
