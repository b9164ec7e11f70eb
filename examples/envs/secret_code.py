"""A tool task the base model cannot solve without its tool: the secret code of a made-up person.

Config: examples/env_secret_code.yaml.  The prompt is a name from examples/envs/secret_names.jsonl
("Mira Okafor"); the environment asks for that person's four-digit secret code.  The code is a hash
of the name: no model knows it, so an answer is right only when the model calls ``lookup_code``
(``<tool_call>{"name": "lookup_code", "arguments": {"name": "Mira Okafor"}}</tool_call>``), reads the
tool message and copies the code into ``<answer>CODE</answer>``.  The first turn without a tool call
is the final answer: reward 1 when its code is right, else 0.
"""

from __future__ import annotations

import hashlib
import re


def code_of(name: str) -> str:
    """The four-digit secret code of ``name`` (case and surrounding spaces ignored)."""
    digest = hashlib.sha256(" ".join(name.split()).lower().encode()).digest()
    return f"{int.from_bytes(digest[:4], 'little') % 10000:04d}"


def lookup_code(name: str) -> str:
    """Look up a person's secret code in the registry.

    Args:
        name: the person's full name, e.g. "Mira Okafor"
    """
    return f"The secret code of {' '.join(name.split())} is {code_of(name)}."


def question(name: str) -> str:
    """What the environment asks about ``name`` (the first observation)."""
    return (f"What is the secret code of {name}? Look it up with the lookup_code tool, then reply with "
            "<answer>CODE</answer>.")


def demonstration(name: str) -> dict:
    """One episode of ``name`` done right, as chat messages (scripts/task_demos.py writes them for seqpg sft)."""
    call = {"type": "function", "function": {"name": "lookup_code", "arguments": {"name": name}}}
    return {"messages": [
        {"role": "user", "content": question(name)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup_code", "content": lookup_code(name)},
        {"role": "assistant", "content": f"<answer>{code_of(name)}</answer>"},
    ]}


def given_code(text: str) -> str | None:
    """The content of the last <answer></answer>, else the last four-digit number in ``text``."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    numbers = re.findall(r"\b\d{4}\b", text)
    return numbers[-1] if numbers else None


class SecretCodeEnv:
    """One question per episode, about the prompt's name; reward 1 for the right code."""

    def reset(self, prompt, seed):
        self.name = prompt.text.strip()
        self.code = code_of(self.name)
        return question(self.name)

    def step(self, model_text):
        given = given_code(model_text)
        return None, float(given == self.code), True, {"code": self.code, "given": given}
