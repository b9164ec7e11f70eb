"""Write demonstrations of the secret-code tool task (examples/env_secret_code.yaml) as a `messages` JSONL.

    python scripts/secret_code_demos.py [--config examples/env_secret_code.yaml] [--n 24] [--out FILE]

Each demonstration is one episode done right: the environment's question about a TRAINING prompt's
name (the split is the config's own, `seqpg.training.build.build_prompts`: held-out names are never
used, which the script checks), an assistant turn that calls lookup_code, the tool's answer, and the
final <answer>CODE</answer>.  Tool calls are written as TRL's SFT datasets hold them
(`tool_calls` with `function.name` / `function.arguments`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env_module():
    spec = importlib.util.spec_from_file_location("secret_code", ROOT / "examples" / "envs" / "secret_code.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demonstration(env, name: str) -> dict:
    """One episode of ``name`` done right, as chat messages."""
    call = {"type": "function", "function": {"name": "lookup_code", "arguments": {"name": name}}}
    return {"messages": [
        {"role": "user", "content": env.question(name)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup_code", "content": env.lookup_code(name)},
        {"role": "assistant", "content": f"<answer>{env.code_of(name)}</answer>"},
    ]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "env_secret_code.yaml"))
    p.add_argument("--n", type=int, default=24, help="demonstrations to write (from the first training prompts)")
    p.add_argument("--out", default=str(ROOT / "examples" / "secret_code_demos.jsonl"))
    args = p.parse_args(argv)
    from seqpg.config import load_config
    from seqpg.training.build import build_prompts

    cfg = load_config(args.config)
    train, held_out = build_prompts(cfg.task)
    names = [pr.text.strip() for pr in train[:args.n]]
    assert not set(names) & {pr.text.strip() for pr in held_out}, "a demonstration would use a held-out prompt"
    env = _env_module()
    Path(args.out).write_text("".join(json.dumps(demonstration(env, n)) + "\n" for n in names))
    print(f"wrote {len(names)} demonstrations (training prompts only) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
