"""Test helpers: environments and a model wrapper that writes scripted turns."""

from __future__ import annotations

import torch
from torch import nn

from seqpg.config import EpisodeConfig

ENV_CALLS = dict(env_timeout_s=EpisodeConfig().env_timeout_s, on_env_error=EpisodeConfig().on_env_error)
"""``sample_episodes``' settings of the calls into environments, the config's defaults."""


class CountdownEnv:
    """Says "try again k" after each turn; done after ``turns`` turns; reward k on turn k."""

    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, prompt, seed):
        self.k = 0
        return prompt.text

    def step(self, model_text):
        self.k += 1
        return f"try again {self.k}", float(self.k), self.k >= self.turns, {"k": self.k}


class ScriptedModel(nn.Module):
    """Wraps a model (one episode at a time): each turn writes the next script string, then EOS.

    A forward with more than one input token starts a turn (the sampler feeds a turn's context as
    one chunk); every forward puts a large bias on the script's next token."""

    def __init__(self, model: nn.Module, tokenizer, scripts: list[str]):
        super().__init__()
        self.inner, self.tok = model, tokenizer
        self.scripts = [tokenizer(s, add_special_tokens=False).input_ids for s in scripts]
        self.config, self.generation_config = model.config, model.generation_config
        self.pointer, self.current = 0, []

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:
            self.current, self.pointer = (self.scripts.pop(0) if self.scripts else []), 0
        nxt = self.current[self.pointer] if self.pointer < len(self.current) else self.tok.eos_token_id
        self.pointer += 1
        out.logits = out.logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(nxt), out.logits.shape[-1])
        return out


def eos_prone(model, eos_id: int, bonus: float = 3.0):
    """Add ``bonus`` to the EOS logit so turns end at varied lengths."""
    def hook(_module, _inputs, logits):
        return logits + bonus * torch.nn.functional.one_hot(torch.tensor(eos_id), logits.shape[-1])
    model.lm_head.register_forward_hook(hook)
    return model
