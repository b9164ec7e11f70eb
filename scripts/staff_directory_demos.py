"""Write demonstrations of the staff-directory tool task (examples/env_staff_directory.yaml) as a `messages` JSONL.

    python scripts/staff_directory_demos.py [--config examples/env_staff_directory.yaml] [--n 24] [--out FILE]

Each demonstration is one episode done right: the environment's question about a TRAINING prompt's name
(the config's own split, `seqpg.training.build.build_prompts`: held-out names are never used, which the
script checks), an assistant turn that calls lookup_person, the tool's record, and the final
<answer>NUMBER</answer> with the asked field's number.  Tool calls are written as TRL's SFT datasets hold
them (`tool_calls` with `function.name` / `function.arguments`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env_module():
    spec = importlib.util.spec_from_file_location("staff_directory", ROOT / "examples" / "envs" / "staff_directory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demonstration(env, name: str) -> dict:
    """One episode of ``name`` done right, as chat messages."""
    call = {"type": "function", "function": {"name": "lookup_person", "arguments": {"name": name}}}
    return {"messages": [
        {"role": "user", "content": env.question(name)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup_person", "content": env.lookup_person(name)},
        {"role": "assistant", "content": f"<answer>{env.number_of(name, env.asked_field(name))}</answer>"},
    ]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "env_staff_directory.yaml"))
    p.add_argument("--n", type=int, default=24, help="demonstrations to write (from the first training prompts)")
    p.add_argument("--out", default=str(ROOT / "examples" / "staff_directory_demos.jsonl"))
    args = p.parse_args(argv)
    from seqpg.config import load_config
    from seqpg.training.build import build_prompts

    cfg = load_config(args.config)
    train, held_out = build_prompts(cfg.task)
    names = [" ".join(pr.text.split()) for pr in train[:args.n]]
    held = {" ".join(pr.text.split()) for pr in held_out}
    assert not set(names) & held, "a demonstration would use a held-out prompt"
    env = _env_module()
    Path(args.out).write_text("".join(json.dumps(demonstration(env, n)) + "\n" for n in names))
    print(f"wrote {len(names)} demonstrations (training prompts only) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
