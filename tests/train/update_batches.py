"""A small scored batch of the tiny model for the update's tests (accumulation, masking, noise scale)."""

from __future__ import annotations

import torch

from seqpg import core
from seqpg.batch import Prompt
from seqpg.rollout.sampling import generate
from seqpg.training.update import TrainBatch


def tiny_update_batch(model, tok) -> TrainBatch:
    """3 prompts x 4 samples of at most 7 tokens, seeded; random rewards, GRPO advantages."""
    prompts = [Prompt("cat", "0"), Prompt("dog", "1"), Prompt("sun", "2")]
    r = generate(model, tok, prompts, n=4, max_new_tokens=7, chat_template=False,
                 generator=torch.Generator().manual_seed(0))
    rewards_B = torch.randn(r.batch_size, generator=torch.Generator().manual_seed(1))
    adv, ret = core.compute_advantages("grpo", rewards_B, r.completion_mask_BC, group_ids=r.group_ids_B)
    return TrainBatch(r, adv, ret, r.sample_logprobs_BC)
