"""The secret-code tool task (examples/env_secret_code.yaml) and its demonstration script."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from seqpg.batch import Prompt
from seqpg.config import load_config
from seqpg.rollout.environments import load_environment
from seqpg.rollout.tools import load_tools, parse_tool_calls, run_tool_calls
from seqpg.model.loading import build_tiny_tokenizer
from seqpg.sft.data import render_settings
from seqpg.sft.demos import conversation, render_demo
from seqpg.training.build import build_prompts

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "env_secret_code.yaml"


def test_only_the_looked_up_code_is_rewarded():
    env = load_environment(f"{ROOT}/examples/envs/secret_code.py:SecretCodeEnv")()
    tools = load_tools([f"{ROOT}/examples/envs/secret_code.py:lookup_code"])
    question = env.reset(Prompt("Mira Okafor", "0"), 0)
    assert "Mira Okafor" in question and "lookup_code" in question
    [call] = parse_tool_calls('<tool_call>{"name": "lookup_code", "arguments": {"name": "Mira Okafor"}}</tool_call>',
                              tools)
    code = run_tool_calls([call], tools)[0].content.split()[-1].rstrip(".")
    assert len(code) == 4 and code.isdigit()
    assert env.step(f"<answer>{code}</answer>")[1:3] == (1.0, True)
    wrong = f"{(int(code) + 1) % 10000:04d}"
    assert env.step(f"<answer>{wrong}</answer>")[1] == 0.0 and env.step("I do not know.")[1] == 0.0


def test_the_demonstrations_use_training_prompts_and_train_the_tool_call(tmp_path):
    out = tmp_path / "demos.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "task_demos.py"), "-c", CONFIG, "--n", "16", "--out",
                    str(out)], check=True, cwd=ROOT)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cfg = load_config(CONFIG, ["model.name=tiny", f"sft.data={out}", "sft.eval_fraction=0"])
    _, held_out = build_prompts(cfg.task)
    held = {p.text for p in held_out}
    assert len(rows) == 16 and not any(n in r["messages"][0]["content"] for r in rows for n in held)
    s = render_settings(cfg)  # as `seqpg sft` renders them, without the tiny model's short context
    tok = build_tiny_tokenizer()
    demo = render_demo(tok, conversation(rows[0], 1, "row 1"), replace(s, max_length=10_000), "row 1")
    acts = tok.decode([i for i, a in zip(demo.ids, demo.action) if a])
    assert acts.startswith('<tool_call>{"name": "lookup_code"') and acts.endswith("</answer><|im_end|>")
    assert "You may call these tools" in tok.decode(demo.ids)  # described as the episodes describe them
