"""sampling.chat_template: unset, the tokenizer decides (a base model has no template and gets raw text);
asked of a tokenizer without a template, it is refused in one line before any model loads."""

from __future__ import annotations

import pytest
import torch

from seqpg.apps.cli import main
from seqpg.batch import Prompt
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.rollout.sampling import encode_prompt, generate, uses_chat_template
from seqpg.training import build


def base_model_tokenizer():
    """The tiny tokenizer as a base model's: no chat template."""
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    return tok


def test_unset_follows_the_tokenizer_and_true_without_a_template_is_refused():
    chat, base = build_tiny_tokenizer(), base_model_tokenizer()
    assert uses_chat_template(chat, None) and not uses_chat_template(base, None)
    assert uses_chat_template(chat, True) and not uses_chat_template(chat, False)
    assert not uses_chat_template(base, False)
    with pytest.raises(ValueError, match="set sampling.chat_template=false"):
        uses_chat_template(base, True)
    assert encode_prompt(base, "hi") == base("hi").input_ids
    assert encode_prompt(chat, "hi") == encode_prompt(chat, "hi", chat_template=True) != chat("hi").input_ids


def test_a_base_model_samples_from_raw_text_by_default():
    tok = base_model_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    batch = generate(model, tok, [Prompt("hello", "0")], max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert batch.prompt_ids_BP[0].tolist() == tok("hello").input_ids


def test_a_template_asked_of_a_model_without_one_is_refused_before_it_loads(tiny_overrides, monkeypatch, capsys):
    monkeypatch.setattr(build, "build_tiny_tokenizer", base_model_tokenizer)

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model loaded before the configuration was refused")
    monkeypatch.setattr(build, "build_policy", no_model)
    code = main(["train", *tiny_overrides("sampling.chat_template=true", "--no-progress")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("seqpg:")]
    assert code == 2 and "sampling.chat_template=false" in lines[-1] and "no chat template" in lines[-1]
