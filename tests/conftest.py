"""Shared fixtures: a tiny in-process model and tokenizer (no files, no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer  # noqa: E402


@pytest.fixture
def tiny_tokenizer():
    """The character-level ChatML tokenizer (101 ids, EOS ``<|im_end|>``, pad ``<pad>``, left padding), fresh per test."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_and_tokenizer(tiny_tokenizer):
    """(model, tokenizer): a fresh seeded 2-layer Llama (hidden 32, fp32, eval mode) per test."""
    return build_tiny_model(len(tiny_tokenizer), seed=0), tiny_tokenizer


def build_rollout(prompt_tokens: list[list[int]], completion_tokens: list[list[int]], *, pad_id: int = 0,
                  group_ids: list[int] | None = None):
    """A ``RolloutBatch`` from token lists: prompts left-padded, completions right-padded.

    Sample log-probs are 0 and ``finished_B`` is True; texts are empty.
    """
    import torch

    from seqpg.batch import Prompt, RolloutBatch

    B = len(prompt_tokens)
    P, C = max(map(len, prompt_tokens)), max(map(len, completion_tokens))
    prompt_ids_BP = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask_BP = torch.zeros((B, P), dtype=torch.bool)
    completion_ids_BC = torch.full((B, C), pad_id, dtype=torch.long)
    completion_mask_BC = torch.zeros((B, C), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_tokens, completion_tokens)):
        prompt_ids_BP[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask_BP[i, P - len(p):] = True
        completion_ids_BC[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask_BC[i, :len(c)] = True
    return RolloutBatch(
        prompts=[Prompt(text="", id=str(i)) for i in range(B)], completions=[""] * B,
        prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP,
        completion_ids_BC=completion_ids_BC, completion_mask_BC=completion_mask_BC,
        sample_logprobs_BC=torch.zeros((B, C)),
        group_ids_B=torch.tensor(group_ids if group_ids is not None else list(range(B))),
        finished_B=torch.ones(B, dtype=torch.bool),
    )


@pytest.fixture
def make_rollout():
    """``build_rollout(prompt_tokens, completion_tokens, *, pad_id=0, group_ids=None) -> RolloutBatch``."""
    return build_rollout
