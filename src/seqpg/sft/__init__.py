"""Supervised fine-tuning on demonstrations (``seqpg sft``): the RL update with the advantage fixed at 1.

    seqpg.sft.demos     JSONL rows -> one render, one tokenisation, the assistant's tokens as the action mask
    seqpg.sft.data      a run's demonstrations: rendered as its episodes are, split into train and held-out
    seqpg.sft.trainer   the loop: ``sft(cfg)``
"""
