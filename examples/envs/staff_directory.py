"""A harder tool task: one number chosen among the several a directory record returns.

Config: examples/env_staff_directory.yaml.  The prompt is a made-up name from examples/envs/secret_names.jsonl
("Mira Okafor"); the environment asks for ONE of that person's five numbers (badge, room, phone, locker, desk;
which one follows from the name).  ``lookup_person`` returns the person's whole record, its fields in an
order that also follows from the name, every number a hash no model knows:

    Mira Okafor: phone 8830, badge 4711, desk 6621, room 2093, locker 1502.

So an answer is right only when the model calls the tool with the name, finds the asked field in the record
and copies ITS number into ``<answer>NUMBER</answer>`` (the secret-code task, examples/envs/secret_code.py,
has one number to copy; here four of five are wrong).  The first turn without a tool call is the final
answer: reward 1 when its last ``<answer>`` holds the asked number, else 0 (no tag, no credit: a model that
echoes the record is not guessing for free).

``DirectoryEnv`` is the environment (``episode.env``), ``lookup_person`` the tool (``episode.tools``): a free
function, so TRL's GRPOTrainer takes it as it is (``tools=``; bench/trl_arm.py).
"""

from __future__ import annotations

import hashlib
import re

FIELDS = ("badge", "room", "phone", "locker", "desk")
"""The numbers every record holds, each asked as "the <field> number"."""


def _hash(*parts: str) -> int:
    key = "|".join([" ".join(parts[0].split()).lower(), *parts[1:]])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def number_of(name: str, field: str) -> str:
    """The four-digit ``field`` number of ``name`` (case and surrounding spaces of the name ignored)."""
    return f"{_hash(name, field) % 10000:04d}"


def asked_field(name: str) -> str:
    """The field the environment asks about ``name``."""
    return FIELDS[_hash(name, "asked") % len(FIELDS)]


def record_order(name: str) -> list[str]:
    """The order of the fields in ``name``'s record (a permutation that follows from the name)."""
    return sorted(FIELDS, key=lambda f: _hash(name, "order", f))


def lookup_person(name: str) -> str:
    """Look up a person's record in the staff directory: their badge, room, phone, locker and desk numbers.

    Args:
        name: the person's full name, e.g. "Mira Okafor"
    """
    name = " ".join(name.split())
    return f"{name}: " + ", ".join(f"{f} {number_of(name, f)}" for f in record_order(name)) + "."


def question(name: str) -> str:
    """What the environment asks about ``name`` (the first observation)."""
    return (f"What is the {asked_field(name)} number of {name}? Look it up with the lookup_person tool, then reply "
            "with <answer>NUMBER</answer>.")


def demonstration(name: str) -> dict:
    """One episode of ``name`` done right, as chat messages (scripts/task_demos.py writes them for seqpg sft)."""
    call = {"type": "function", "function": {"name": "lookup_person", "arguments": {"name": name}}}
    return {"messages": [
        {"role": "user", "content": question(name)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup_person", "content": lookup_person(name)},
        {"role": "assistant", "content": f"<answer>{number_of(name, asked_field(name))}</answer>"},
    ]}


def given_answer(text: str) -> str | None:
    """The content of the last <answer></answer> in ``text``, stripped; None without one."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return tagged[-1].strip() if tagged else None


class DirectoryEnv:
    """One question per episode, about the prompt's name; reward 1 for the asked number."""

    def reset(self, prompt, seed):
        self.name = " ".join(prompt.text.split())
        self.field = asked_field(self.name)
        self.number = number_of(self.name, self.field)
        return question(self.name)

    def step(self, model_text):
        given = given_answer(model_text)
        return None, float(given == self.number), True, {"field": self.field, "number": self.number, "given": given}
