"""The staff-directory tool task (examples/env_staff_directory.yaml) and its demonstration script."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from seqpg.batch import Prompt
from seqpg.config import load_config
from seqpg.model.loading import build_tiny_tokenizer
from seqpg.rollout.environments import load_environment
from seqpg.rollout.tools import load_tools, parse_tool_calls, run_tool_calls
from seqpg.sft.data import render_settings
from seqpg.sft.demos import conversation, render_demo
from seqpg.training.build import build_prompts

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "env_staff_directory.yaml"
ENV = f"{ROOT}/examples/envs/staff_directory.py"


def _record(name: str) -> dict[str, str]:
    tools = load_tools([f"{ENV}:lookup_person"])
    [call] = parse_tool_calls(f'<tool_call>{{"name": "lookup_person", "arguments": {{"name": "{name}"}}}}</tool_call>',
                              tools)
    text = run_tool_calls([call], tools)[0].content
    assert text.startswith(f"{name}: ") and text.endswith(".")
    return dict(part.split() for part in text[len(name) + 2:-1].split(", "))


def test_only_the_asked_number_of_the_record_is_rewarded():
    env = load_environment(f"{ENV}:DirectoryEnv")()
    question = env.reset(Prompt("Mira Okafor", "0"), 0)
    record = _record("Mira Okafor")
    assert sorted(record) == ["badge", "desk", "locker", "phone", "room"]
    [field] = [f for f in record if f"the {f} number of Mira Okafor" in question]
    assert "lookup_person" in question and "<answer>NUMBER</answer>" in question
    assert env.step(f"<answer>{record[field]}</answer>")[1:3] == (1.0, True)
    for other in set(record) - {field}:
        if record[other] != record[field]:
            assert env.step(f"<answer>{record[other]}</answer>")[1] == 0.0
    assert env.step(f"The {field} number is {record[field]}.")[1] == 0.0  # no tag, no credit


def test_the_asked_field_and_the_record_order_vary_with_the_name():
    rows = (ROOT / "examples" / "envs" / "secret_names.jsonl").read_text().splitlines()
    names = [json.loads(line)["prompt"] for line in rows]
    env = load_environment(f"{ENV}:DirectoryEnv")()
    asked = {env.reset(Prompt(n, "0"), 0).split()[3] for n in names[:40]}
    orders = {tuple(_record(n)) for n in names[:40]}
    assert len(asked) == 5 and len(orders) > 10  # neither the question nor the position gives the answer away


def test_the_demonstrations_use_training_prompts_and_answer_the_asked_number(tmp_path):
    out = tmp_path / "demos.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "task_demos.py"), "-c", CONFIG, "--n", "16", "--out",
                    str(out)], check=True, cwd=ROOT)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cfg = load_config(CONFIG, ["model.name=tiny", f"sft.data={out}", "sft.eval_fraction=0"])
    _, held_out = build_prompts(cfg.task)
    held = {p.text for p in held_out}
    assert len(rows) == 16 and not any(n in r["messages"][0]["content"] for r in rows for n in held)
    env = load_environment(f"{ENV}:DirectoryEnv")()
    for row in rows:
        name = row["messages"][1]["tool_calls"][0]["function"]["arguments"]["name"]
        assert row["messages"][0]["content"] == env.reset(Prompt(name, "0"), 0)
        assert env.step(row["messages"][-1]["content"])[1] == 1.0
    s = render_settings(cfg)
    tok = build_tiny_tokenizer()
    demo = render_demo(tok, conversation(rows[0], 1, "row 1"), replace(s, max_length=10_000), "row 1")
    acts = tok.decode([i for i, a in zip(demo.ids, demo.action) if a])
    assert acts.startswith('<tool_call>{"name": "lookup_person"') and acts.endswith("</answer><|im_end|>")
