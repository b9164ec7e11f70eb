"""Write demonstrations of a tool task as a `messages` JSONL, for `seqpg sft`.

    python scripts/task_demos.py -c examples/env_secret_code.yaml [--n 24] [--out FILE]

The task's environment file (the config's `episode.env`, e.g. `examples/envs/secret_code.py:SecretCodeEnv`)
defines `demonstration(name) -> {"messages": [...]}`: one episode of that name done right (the question,
the assistant's tool call, the tool's answer, the final answer), tool calls written as TRL's SFT datasets
hold them (`tool_calls` with `function.name` / `function.arguments`).  The names are the first N of the
config's TRAINING prompts (its own split, `seqpg.training.build.build_prompts`): a held-out name is never
used, which the script checks.  FILE defaults to the config's `sft.data`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def task_module(env_spec: str):
    """The module of an ``episode.env`` given as ``path/to/file.py:Class``, or a SystemExit saying why not."""
    path = Path(env_spec.split(":")[0])
    path = path if path.is_absolute() else ROOT / path
    if path.suffix != ".py" or not path.is_file():
        raise SystemExit(f"episode.env={env_spec}: not a Python file of this checkout")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "demonstration", None)):
        raise SystemExit(f"{path.relative_to(ROOT)} defines no demonstration(name): it has no demonstrations")
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="the task (an episode.env file that defines demonstration)")
    p.add_argument("--n", type=int, default=24, help="demonstrations to write (from the first training prompts)")
    p.add_argument("--out", default=None, help="default: the config's sft.data")
    args = p.parse_args(argv)
    from seqpg.config import load_config
    from seqpg.training.build import build_prompts

    cfg = load_config(args.config)
    out = args.out or cfg.sft.data
    if cfg.episode.env is None or out is None:
        raise SystemExit(f"{args.config}: needs episode.env and sft.data (or --out)")
    module = task_module(cfg.episode.env)
    train, held_out = build_prompts(cfg.task)
    names = [" ".join(pr.text.split()) for pr in train[:args.n]]
    assert not set(names) & {" ".join(pr.text.split()) for pr in held_out}, "a demonstration would use a held-out prompt"
    Path(out).write_text("".join(json.dumps(module.demonstration(n)) + "\n" for n in names))
    print(f"wrote {len(names)} demonstrations (training prompts only) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
