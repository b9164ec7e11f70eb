"""Arm (d) of bench/sft_then_rl.py: TRL's own recipe, SFTTrainer then GRPOTrainer, on a seqpg tool task.

    python bench/trl_arm.py --config examples/env_staff_directory.yaml --minutes 10 --out DIR
                            [--sft-lr 1e-4] [--sft-only] [key=value ...]   # seqpg config overrides

The same task as the seqpg arms, read from the seqpg config: the model (``model.name``), the demonstrations
(``sft.data``, the same rows trained as `seqpg sft` trains: its ``eval_fraction`` split), ``sft.epochs`` and
``sft.batch_size``, the training prompts (the config's split: held-out prompts never seen), the tools
(``episode.tools``, given to GRPOTrainer as ``tools=``), ``episode.max_turns``, and the reward: the config's
environment (``episode.env``, a seqpg environment whose first turn without a tool call is the answer) is
reset on the row's prompt and steps once on the episode's last assistant message.  RL settings follow the
config: ``samples_per_prompt`` generations per prompt, ``prompts_per_step`` prompts a step, ``optim.lr``,
``algo.kl_coef`` as GRPO's beta, ``episode.max_turns`` - 1 tool rounds and the turns' tokens as the
episode's (:func:`episode_tokens`), temperature 1, ``threads``; the rest is TRL's defaults.

SmolLM2's chat template does not render tool calls, and TRL refuses such a template for tools (its
``supports_tool_calling`` check) and parses tool calls only for templates it knows (``add_response_schema``).
So the tokenizer gets TRL's own ChatML tool template (Qwen2.5's, the same ``<|im_start|>`` tokens SmolLM2 was
trained on) and its response parser; the model is saved with that template, and ``seqpg eval DIR -c CONFIG``
renders the held-out episodes with it (the template takes ``tools=``), as TRL trained them.

Wall clock: SFT for ``sft.epochs``, then GRPO until ``--minutes`` of training (loading not counted) are
spent; ``DIR/sft`` and ``DIR/final`` are Hugging Face model directories; ``DIR/timing.json`` the minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_task(config: str, overrides: list[str]):
    """(cfg, training prompts, tools, environment class) of a seqpg config, as its runs load them."""
    from seqpg.config import load_config
    from seqpg.rollout.environments import load_environment
    from seqpg.rollout.tools import load_tools
    from seqpg.training.build import build_prompts

    cfg = load_config(config, overrides)
    if cfg.episode.env is None or not cfg.episode.tools:
        raise SystemExit(f"{config}: arm (d) needs a tool task (episode.env and episode.tools)")
    train, _ = build_prompts(cfg.task)
    return cfg, train, load_tools(list(cfg.episode.tools)), load_environment(cfg.episode.env)


def sft_rows(cfg, tools) -> list[dict]:
    """The demonstrations `seqpg sft` trains on (its held-out split removed), each with the tools' schemas."""
    from seqpg.sft.data import split_held_out

    rows = [json.loads(line) for line in Path(cfg.sft.data).read_text().splitlines() if line.strip()]
    train, _ = split_held_out(list(range(len(rows))), cfg.sft.eval_fraction, cfg.seed)
    schemas = [t.schema for t in tools.values()]
    return [{"messages": rows[i]["messages"], "tools": schemas} for i in train]


def tool_tokenizer(model_dir: Path):
    """The model's tokenizer with TRL's ChatML tool template and the matching tool-call parser."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import add_response_schema, qwen2_5_chat_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = qwen2_5_chat_template
    tok.pad_token = tok.pad_token or tok.eos_token
    return add_response_schema(tok)


def make_reward(env_cls):
    """A TRL reward function: the seqpg environment reset on the row's prompt, stepped on the final answer."""
    from seqpg.batch import Prompt

    def task_reward(completions, prompt_text, prompt_id, **kwargs) -> list[float]:
        rewards = []
        for completion, text, pid in zip(completions, prompt_text, prompt_id, strict=True):
            turns = [m for m in completion if m.get("role") == "assistant"] if isinstance(completion, list) else []
            final = (turns[-1].get("content") or "") if turns else (completion if isinstance(completion, str) else "")
            env = env_cls()
            env.reset(Prompt(text, pid), 0)
            rewards.append(float(env.step(final)[1]))
        return rewards

    return task_reward


def precision(cfg) -> dict:
    """TRL's precision arguments as the seqpg runs train: bf16 autocast only when the config's ``bf16`` is on (TRL's
    default is on), gradient checkpointing as the config's ``model.gradient_checkpointing`` (TRL's default is on)."""
    return {"bf16": cfg.bf16, "gradient_checkpointing": cfg.model.gradient_checkpointing}


class WallClock:
    """A TrainerCallback that stops training once ``seconds`` of steps have run."""

    def __init__(self, seconds: float):
        from transformers import TrainerCallback

        outer = self

        class _Stop(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.t0 = time.monotonic()

            def on_step_end(self, args, state, control, **kw):
                if time.monotonic() - outer.t0 >= seconds:
                    control.should_training_stop = True

        self.seconds, self.t0, self.callback = seconds, time.monotonic(), _Stop()


def run_sft(cfg, tools, tok, model_dir: Path, out: Path, lr: float, seconds: float) -> float:
    """TRL SFTTrainer on the demonstrations for ``sft.epochs`` (stopped at ``seconds``); minutes trained."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out / "sft_work"), num_train_epochs=cfg.sft.epochs, learning_rate=lr,
                     per_device_train_batch_size=cfg.sft.batch_size, assistant_only_loss=True, use_cpu=True,
                     save_strategy="no", report_to=[], logging_steps=1, seed=cfg.seed, max_length=cfg.sft.max_length,
                     **precision(cfg))
    clock = WallClock(seconds)
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(sft_rows(cfg, tools)),
                         processing_class=tok, callbacks=[clock.callback])
    trainer.train()
    minutes = (time.monotonic() - clock.t0) / 60
    trainer.save_model(str(out / "sft"))
    tok.save_pretrained(str(out / "sft"))
    return minutes


def episode_tokens(cfg) -> int:
    """TRL's ``max_completion_length``, the whole episode's tokens (TRL has no per-turn limit): every turn's
    ``max_new_tokens`` and 100 tokens for each tool result between them, within ``episode.max_episode_tokens``."""
    e = cfg.episode
    return min(e.max_turns * cfg.sampling.max_new_tokens + (e.max_turns - 1) * 100, e.max_episode_tokens)


def run_grpo(cfg, train, tools, env_cls, tok, model_dir: Path, out: Path, seconds: float) -> float:
    """TRL GRPOTrainer on the training prompts with the task's tools and reward for ``seconds``; minutes trained."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok.padding_side = "left"  # GRPOTrainer's requirement
    env = env_cls()
    rows = [{"prompt": [{"role": "user", "content": env.reset(p, 0)}], "prompt_text": p.text, "prompt_id": p.id}
            for p in train]
    s = cfg.sampling
    args = GRPOConfig(output_dir=str(out / "grpo_work"), learning_rate=cfg.optim.lr, beta=cfg.algo.kl_coef,
                      num_generations=s.samples_per_prompt,
                      per_device_train_batch_size=s.samples_per_prompt * s.prompts_per_step,
                      max_completion_length=episode_tokens(cfg), temperature=1.0,
                      max_tool_calling_iterations=cfg.episode.max_turns - 1, max_steps=100_000, use_cpu=True,
                      save_strategy="no", report_to=[], logging_steps=1, seed=cfg.seed, **precision(cfg))
    clock = WallClock(seconds)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=make_reward(env_cls), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok,
                          tools=[t.fn for t in tools.values()], callbacks=[clock.callback])
    trainer.train()
    minutes = (time.monotonic() - clock.t0) / 60
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    return minutes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/env_staff_directory.yaml")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall clock, SFT and GRPO together")
    p.add_argument("--out", required=True, help="directory for the model directories and timing.json")
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--sft-only", action="store_true", help="arm (d'): TRL's SFTTrainer alone, for the whole budget")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the seqpg config")
    args = p.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from seqpg.model.loading import resolve_model

    cfg, train, tools, env_cls = load_task(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(cfg.model.name)
    budget = args.minutes * 60
    if args.sft_only:
        cfg = replace(cfg, sft=replace(cfg.sft, epochs=100_000))
    timing = {"sft_minutes": run_sft(cfg, tools, tool_tokenizer(model_dir), model_dir, out, args.sft_lr, budget)}
    if not args.sft_only:
        left = max(budget - timing["sft_minutes"] * 60, 6.0)
        timing["grpo_minutes"] = run_grpo(cfg, train, tools, env_cls, tool_tokenizer(model_dir), out / "sft", out,
                                          left)
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    print(f"TRL arm: {json.dumps(timing)}; models in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
