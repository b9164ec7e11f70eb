"""Tiny models, resolving and converting checkpoints, loading with LoRA, reference policy, critic."""

from __future__ import annotations

import string

import pytest
import torch

import seqpg.model.loading as models
from seqpg.model.loading import (LoraArgs, build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer,
                                 resolve_model)
from seqpg.training.critic import ValueCritic, ValueHead, critic_values
from seqpg.training.reference import ReferencePolicy, reference_logprobs_context
from seqpg.model.policy import completion_logprobs

PROMPT_TOKENS = [[10, 11, 12], [20, 21, 22, 23, 24, 25]]
COMPLETION_TOKENS = [[40, 41, 42, 43], [50, 2]]


# --- tiny tokenizer and model ------------------------------------------------------------------

def test_tiny_tokenizer_round_trips_ascii_and_has_chatml_specials():
    tok = build_tiny_tokenizer()
    text = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("<|im_start|>a<|im_end|>", add_special_tokens=False).input_ids == [1, tok.convert_tokens_to_ids("a"), 2]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == ("<|im_end|>", 2, 0, "left")
    assert len(tok) == 101


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_model(101, seed=0), build_tiny_model(101, seed=0), build_tiny_model(101, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.lm_head.weight.dtype == torch.float32 and a.config.vocab_size == 101
    with pytest.raises(ValueError, match="llama"):
        build_tiny_model(101, arch="gpt2")


# --- resolve_model -----------------------------------------------------------------------------

@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model_and_tokenizer):
    """A saved tiny HF checkpoint directory (model + tokenizer)."""
    model, tok = tiny_model_and_tokenizer
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def fake_converter(monkeypatch, tiny_model_and_tokenizer):
    """Replace the GGUF -> safetensors writer by one that saves the tiny model; count its calls."""
    calls = []

    def write(gguf_path, out_dir):
        calls.append(gguf_path)
        model, tok = tiny_model_and_tokenizer
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    monkeypatch.setattr(models, "_write_hf_checkpoint_from_gguf", write)
    return calls


def test_local_hf_checkpoint_is_returned_as_is(tiny_checkpoint):
    assert resolve_model(tiny_checkpoint) == tiny_checkpoint
    assert resolve_model(str(tiny_checkpoint)) == tiny_checkpoint


def test_unknown_name_errors_with_the_aliases(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct") as err:
        resolve_model(tmp_path / "nowhere", cache_dir=tmp_path)
    assert "nowhere" in str(err.value)


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, fake_converter, monkeypatch):
    gguf = tmp_path / "src" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    monkeypatch.setenv("SEQPG_CACHE", str(tmp_path / "cache"))
    first = resolve_model(gguf)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("gguf-m-")
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert resolve_model(gguf) == first and resolve_model(gguf.parent) == first  # a directory holding it too
    assert fake_converter == [gguf]
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left
    (gguf.parent / "other.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="several"):
        resolve_model(gguf.parent)


def test_alias_conversion_losing_a_race_keeps_the_winner(tmp_path, monkeypatch, tiny_model_and_tokenizer):
    gguf = tmp_path / "pkg.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setattr(models, "_packaged_file", lambda package, file_name, alias: gguf)
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"

    def write_while_another_process_wins(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        target.mkdir()
        (target / "winner").write_text("1")
    monkeypatch.setattr(models, "_write_hf_checkpoint_from_gguf", write_while_another_process_wins)
    assert resolve_model("smollm2-135m-instruct", cache_dir=tmp_path / "cache") == target
    assert sorted(p.name for p in target.iterdir()) == ["winner"]
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")

    def fail(gguf_path, out_dir):
        raise RuntimeError("bad file")
    monkeypatch.setattr(models, "_write_hf_checkpoint_from_gguf", fail)
    with pytest.raises(RuntimeError, match="bad file"):
        resolve_model(gguf, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --- loading, LoRA, reference policy -----------------------------------------------------------

def test_load_sets_left_padding_and_falls_back_to_eos_for_pad(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    tok.pad_token = None
    tok.padding_side = "right"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model_and_tokenizer(tmp_path)
    assert loaded_tok.pad_token == "<|im_end|>" and loaded_tok.padding_side == "left"
    assert loaded.config.pad_token_id == 2
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_lora_trains_only_adapters_and_starts_equal_to_base(tiny_checkpoint, make_rollout):
    base, _ = load_model_and_tokenizer(tiny_checkpoint)
    model, _ = load_model_and_tokenizer(tiny_checkpoint, lora=LoraArgs(r=4, alpha=8, target_modules=["q_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n in trainable)
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(model, batch).logprobs_BC,
                                   completion_logprobs(base, batch).logprobs_BC)


def _perturb(params, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))


def test_reference_policy_full_finetune_is_a_frozen_copy(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    ref = ReferencePolicy(model)
    before_BC = ref.logprobs(batch)
    _perturb([model.lm_head.weight])
    with torch.no_grad():
        policy_BC = completion_logprobs(model, batch).logprobs_BC
    assert (policy_BC - before_BC).abs().max() > 1e-2
    torch.testing.assert_close(ref.logprobs(batch), before_BC, atol=0, rtol=0)
    assert not ref.logprobs(batch).requires_grad
    with pytest.raises(TypeError, match="ReferencePolicy"):
        with reference_logprobs_context(model):
            pass


def test_reference_policy_lora_disables_adapters(tiny_checkpoint, make_rollout):
    model, _ = load_model_and_tokenizer(tiny_checkpoint, lora=LoraArgs(r=4, target_modules=["q_proj", "v_proj"]))
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    ref = ReferencePolicy(model)
    before_BC = ref.logprobs(batch)
    _perturb([p for n, p in model.named_parameters() if "lora_B" in n])
    model.train()
    with torch.no_grad():
        policy_BC = completion_logprobs(model, batch).logprobs_BC
    assert (policy_BC - before_BC).abs().max() > 1e-3
    torch.testing.assert_close(ref.logprobs(batch), before_BC, atol=1e-6, rtol=0)
    assert model.training  # mode restored
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(model, batch).logprobs_BC, policy_BC)  # adapters back on


# --- critic ------------------------------------------------------------------------------------

def test_value_head_starts_at_zero_and_masks_padding(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    head = ValueHead(32)
    out = completion_logprobs(model, batch, with_hidden=True)
    assert torch.equal(critic_values(head, batch, policy_out=out), torch.zeros(2, 4))
    _perturb(head.parameters())
    values_BC = critic_values(head, batch, policy_out=out)
    assert (values_BC[0] != 0).all() and (values_BC[1, 2:] == 0).all() and (values_BC[1, :2] != 0).all()
    with pytest.raises(ValueError, match="with_hidden"):
        critic_values(head, batch)


def test_shared_head_equals_separate_critic_on_the_same_trunk(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    separate = ValueCritic(model.model, hidden_size=32)
    _perturb(separate.head.parameters())
    shared = separate.head
    with torch.no_grad():
        out = completion_logprobs(model, batch, with_hidden=True)
        torch.testing.assert_close(critic_values(shared, batch, policy_out=out), critic_values(separate, batch),
                                   atol=1e-5, rtol=1e-5)


def test_value_at_t_does_not_see_completion_token_t(tiny_model_and_tokenizer, make_rollout):
    """V(s_t) is the value of the state before y_t: changing y_2 changes V at t >= 3 only."""
    model, _ = tiny_model_and_tokenizer
    critic = ValueCritic(model.model, hidden_size=32)
    _perturb(critic.head.parameters())
    changed = [[40, 41, 77, 43], [50, 2]]
    with torch.no_grad():
        a_BC = critic_values(critic, make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS))
        b_BC = critic_values(critic, make_rollout(PROMPT_TOKENS, changed))
    torch.testing.assert_close(a_BC[0, :3], b_BC[0, :3], atol=1e-6, rtol=0)
    assert (a_BC[0, 3] - b_BC[0, 3]).abs() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradient(tiny_checkpoint, make_rollout):
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    grads = []
    for checkpointing in (False, True):
        model, _ = load_model_and_tokenizer(tiny_checkpoint, gradient_checkpointing=checkpointing)
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        completion_logprobs(model, batch).logprobs_BC.sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])
