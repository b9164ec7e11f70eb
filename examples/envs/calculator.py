"""A tool environment: an arithmetic question the model may answer with the help of a calculator.

Config (examples/env_calculator.yaml):

    env: examples/envs/calculator.py:CalculatorEnv
    tools: [examples/envs/calculator.py:calculate]

A turn that calls ``calculate`` (``<tool_call>{"name": "calculate", "arguments": {"expression":
"17 * 23"}}</tool_call>``) is answered by the tool; the first turn without a tool call is the
final answer: reward 1 when its ``<answer>`` (or, without tags, its last number) is right, else 0.
"""

from __future__ import annotations

import ast
import operator
import random
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "(17 + 4) * 3"
    """
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    value = ev(ast.parse(expression, mode="eval"))
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def final_number(text: str) -> str | None:
    """The content of the last <answer></answer>, else the last number in ``text``."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return numbers[-1] if numbers else None


class CalculatorEnv:
    """``a op b`` with operands up to ``max_operand``; one final answer, reward 1 if right."""

    def __init__(self, max_operand: int = 999, ops: str = "+-*"):
        self.max_operand, self.ops = max_operand, ops

    def reset(self, prompt, seed):
        rng = random.Random(seed)
        a, b, op = rng.randint(2, self.max_operand), rng.randint(2, self.max_operand), rng.choice(self.ops)
        self.answer = calculate(f"{a} {op} {b}")
        return (f"What is {a} {op} {b}? You may call the calculate tool. "
                "Give the final answer as <answer>number</answer>.")

    def step(self, model_text):
        given = final_number(model_text)
        correct = given is not None and given == self.answer
        return None, float(correct), True, {"answer": self.answer, "given": given}
