"""The demonstrations of an SFT run: read, rendered with the run's tokenizer, split into train and held-out.

Read before any model loads (the tokenizer only), so a bad row fails in a second with its line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import RolloutBatch
from ..config import ConfigError, TrainConfig
from .demos import Demo, DemoError, RenderSettings, demos_batch, load_demos


@dataclass
class SftData:
    """Rendered demonstrations: the rows trained on and the held-out rows."""

    train: list[Demo]
    held_out: list[Demo]
    pad_id: int
    tokenizer: object

    def train_batch(self, rows: list[int]) -> RolloutBatch:
        return demos_batch([self.train[i] for i in rows], self.pad_id, tokenizer=self.tokenizer)

    def held_out_batch(self) -> RolloutBatch:
        return demos_batch(self.held_out, self.pad_id, tokenizer=self.tokenizer)


def render_settings(cfg: TrainConfig) -> RenderSettings:
    """Rendering as the run's episodes render: its chat template, system prompt and tools (``episode.tools``)."""
    from ..rollout.tools import load_tools

    try:
        tools = tuple(load_tools(list(cfg.episode.tools)).values())
    except (ValueError, TypeError, AttributeError, ImportError, OSError, SyntaxError) as e:
        raise ConfigError(f"episode.tools: {e}") from e
    s = cfg.sampling
    return RenderSettings(chat_template=s.chat_template, system_prompt=s.system_prompt, tools=tools,
                          max_length=cfg.sft.max_length)


def run_tokenizer(cfg: TrainConfig):
    """The tokenizer of ``model.name`` and the model's context length (None: unknown), nothing else loaded."""
    from ..model.loading import TINY_CONTEXT, build_tiny_tokenizer, context_length, load_tokenizer, resolve_model

    if cfg.model.name == "tiny":
        return build_tiny_tokenizer(), TINY_CONTEXT
    path = resolve_model(cfg.model.name)
    return load_tokenizer(path), context_length(path)


def split_held_out(demos: list[Demo], fraction: float, seed: int) -> tuple[list[Demo], list[Demo]]:
    """(train, held-out): ``fraction`` of the rows (at least one when above 0), chosen by a permutation seeded by
    ``seed``; each part in file order."""
    if fraction <= 0 or len(demos) < 2:
        return list(demos), []
    k = min(len(demos) - 1, max(1, round(fraction * len(demos))))
    held = set(torch.randperm(len(demos), generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return [d for i, d in enumerate(demos) if i not in held], [d for i, d in enumerate(demos) if i in held]


def load_sft_data(cfg: TrainConfig) -> SftData:
    """The run's demonstrations, rendered and split; every problem a :class:`ConfigError` naming file and line."""
    s = cfg.sft
    if s.data is None:
        raise ConfigError("sft.data is not set; give the demonstrations, e.g. sft.data=demos.jsonl (JSONL rows with "
                          "`messages` or `prompt` and `completion`)")
    tok, n_ctx = run_tokenizer(cfg)
    settings = render_settings(cfg)
    if n_ctx is not None and settings.max_length > n_ctx:
        settings = RenderSettings(settings.chat_template, settings.system_prompt, settings.tools, n_ctx)
    try:
        demos = load_demos(s.data, tok, settings)
        if s.eval_data is not None:
            train, held_out = demos, load_demos(s.eval_data, tok, settings)
        else:
            train, held_out = split_held_out(demos, s.eval_fraction, cfg.seed)
    except DemoError as e:
        raise ConfigError(str(e)) from e
    if len(train) < s.batch_size:
        raise ConfigError(f"sft.batch_size={s.batch_size} exceeds the {len(train)} training demonstrations (after "
                          f"holding out {len(held_out)}); lower sft.batch_size or add rows")
    return SftData(train, held_out, tok.pad_token_id, tok)
