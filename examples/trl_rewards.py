"""Reward functions written for TRL's GRPOTrainer, used by seqpg unchanged (examples/trl_reward.yaml).

Each is called once per batch as TRL calls it: ``f(prompts=..., completions=..., completion_ids=...,
trainer_state=..., **dataset_columns)`` and returns one float per completion, or None where the reward
does not apply to that sample. These are written for TRL's conversational format (each completion is
``[{"role": "assistant", "content": ...}]``); the config says so with ``conversational: true``.
"""

import re


def answer_reward(completions, answer, **kwargs):
    """1.0 when the last number of the completion equals the dataset's `answer` column, else 0.0;
    None for samples without an answer (e.g. the open-ended prompts of a mixed dataset)."""
    contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, ref in zip(contents, answer):
        if ref is None:
            rewards.append(None)
            continue
        numbers = re.findall(r"-?\d+", content)
        rewards.append(1.0 if numbers and numbers[-1] == str(ref).strip() else 0.0)
    return rewards


def format_reward(completions, **kwargs):
    """1.0 when the completion puts its answer inside <answer></answer> tags, else 0.0."""
    pattern = r"<answer>.*?</answer>"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.search(pattern, content, re.DOTALL) else 0.0 for content in contents]


def brevity_penalty(completions, completion_ids, **kwargs):
    """Minus the number of completion tokens beyond 24 (TRL passes the token ids as `completion_ids`)."""
    return [-float(max(0, len(ids) - 24)) for ids in completion_ids]
