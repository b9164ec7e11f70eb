"""Builders: turn configuration sections into the plain objects the training loop calls.

Order matters for users: scorers and prompts are built (and so checked) before any model
loads, so a typo in a scorer name fails in a second, not after a minute of loading weights.
With several processes, everything up to the models is built by each process on its own (an
error on one stops all, see ``DistContext.fail_together``); then the models are replicated or
sharded (``Parallel.wrap``), and only then is the optimizer built on their parameters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import core
from ..rollout import cpu_caps
from ..config import AlgoConfig, ConfigError, ModelConfig, OptimConfig, ScorerConfig, TaskConfig, TrainConfig, \
    validate_for_processes
from .critic import Critic, build_critic
from .distributed import DistContext, Parallel
from .memory import keep_freed_memory
from ..model.loading import LoraArgs, build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer, resolve_model
from .reference import ReferencePolicy
from ..rewards.scorers import make_scorer
from ..rewards.tasks import PromptStream, train_eval_prompts
from ..rollout.interface import Rollouts
from .step import StepSettings


@dataclass
class Components:
    """The run's parts; the step's decisions are in ``settings``, made once from the config."""

    settings: StepSettings
    policy: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scorers: list
    stream: PromptStream
    eval_prompts: list
    kl_ctl: object
    parallel: Parallel
    reference: ReferencePolicy | None = None
    critic: Critic | None = None
    extra_modules: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_scorers(rewards: list[ScorerConfig]) -> list:
    """[(Scorer, weight)] from the config; unknown kinds and bad parameters fail here."""
    out = []
    for r in rewards:
        try:
            out.append((make_scorer(r.kind, name=r.name or r.kind, **r.params), r.weight))
        except (TypeError, ValueError, KeyError, ImportError, AttributeError, OSError) as e:
            raise ConfigError(f"rewards: scorer {r.name or r.kind!r} (kind {r.kind!r}): {e}") from e
    return out


def build_prompts(task: TaskConfig) -> tuple[list, list]:
    """(train prompts, held-out prompts), disjoint."""
    try:
        return train_eval_prompts(task.source, task.name, train_size=task.train_size, eval_size=task.eval_size,
                                  seed=task.seed, params=task.params, prompt_column=task.prompt_column,
                                  instruction=task.instruction)
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise ConfigError(f"task ({task.source} {task.name!r}): {e}") from e


def fit_to_context(cfg: TrainConfig, rollouts: Rollouts, *prompt_lists: list) -> tuple[list, ...]:
    """The rollouts' budget checked against the model's context (``Rollouts.check_context``), and each
    list of prompts measured against the context minus ``sampling.max_new_tokens``
    (chat template and system prompt included), as ``task.overlong_prompts`` says. Reads only the
    tokenizer and the model's config: nothing heavy loads.  A chat template asked of a tokenizer
    without one fails here (``sampling.chat_template``)."""
    import sys

    from ..model.loading import TINY_CONTEXT, context_length, load_tokenizer
    from ..rollout.sampling import encode_prompt, uses_chat_template
    from ..rewards.tasks import fit_prompts

    if cfg.model.name == "tiny":
        tok, n_ctx = build_tiny_tokenizer(), TINY_CONTEXT
    else:
        path = resolve_model(cfg.model.name)
        tok, n_ctx = load_tokenizer(path), context_length(path)
    try:
        uses_chat_template(tok, cfg.sampling.chat_template)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model.name!r}: {e}") from e
    rollouts.check_template(tok)  # a template that rewrites history or refuses an episode's order: before any model
    if n_ctx is None:
        return prompt_lists
    rollouts.check_context(n_ctx)
    s = cfg.sampling
    limit = n_ctx - s.max_new_tokens
    if limit < 1:
        raise ConfigError(f"sampling.max_new_tokens={s.max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {n_ctx} positions; lower it")

    def length(text: str) -> int:
        return len(encode_prompt(tok, text, chat_template=s.chat_template, system_prompt=s.system_prompt))

    out = []
    for prompts in prompt_lists:
        try:
            kept, notes = fit_prompts(prompts, length, limit, overlong=cfg.task.overlong_prompts)
        except ValueError as e:
            raise ConfigError(f"task ({cfg.task.source} {cfg.task.name!r}): {e}") from e
        if notes:
            print(f"seqpg: {len(notes)} prompt(s) longer than the context allows ({limit} tokens): "
                  f"{notes[0]}{' ...' if len(notes) > 1 else ''}", file=sys.stderr)
        if not kept:
            raise ConfigError(f"task ({cfg.task.source} {cfg.task.name!r}): every prompt is over {limit} tokens")
        out.append(kept)
    return tuple(out)


def build_policy(m: ModelConfig, seed: int, device: torch.device):
    """(model, tokenizer) from the model section, on `device`, in train mode."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m.dtype]
    lora = LoraArgs(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                    target_modules=list(m.lora_target_modules)) if m.lora_r > 0 else None
    if m.name == "tiny":
        tok = build_tiny_tokenizer()
        model = build_tiny_model(len(tok), hidden_size=m.tiny_hidden_size, num_layers=m.tiny_layers, seed=seed)
        model = model.to(dtype)
        if m.gradient_checkpointing:  # as load_model_and_tokenizer does for every other model
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            from ..model.loading import apply_lora
            model = apply_lora(model, lora)
    else:
        model, tok = load_model_and_tokenizer(resolve_model(m.name), dtype=dtype, lora=lora,
                                              gradient_checkpointing=m.gradient_checkpointing)
    model.to(device).train()
    return model, tok


def build_components(cfg: TrainConfig, dist: DistContext) -> Components:
    """Everything `train()` needs, built in the order that fails fastest.

    Every process calls this; the models come back replicated or sharded across processes
    (``Components.parallel``), ``Components.policy`` being the module the update trains.
    """
    validate_for_processes(cfg, dist.world_size)
    settings = StepSettings.from_config(cfg)
    with dist.fail_together("setup"):
        scorers = build_scorers(cfg.rewards)
        train_prompts, eval_prompts = build_prompts(cfg.task)
        train_prompts, eval_prompts = fit_to_context(cfg, settings.rollouts, train_prompts, eval_prompts)
        seed_everything(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.bf16:
            cpu_caps.warn_if_bf16_is_slow(dist.device)
        if cfg.sampling.dtype == "bfloat16":
            cpu_caps.warn_if_bf16_is_slow(dist.device, "sampling.dtype=bfloat16")
        if cfg.sampling.dtype == "int8" and torch.device(dist.device).type != "cpu":
            raise ConfigError(f"sampling.dtype=int8 runs on the CPU only (torch's int8 dynamic products), and this "
                              f"run trains on {dist.device} (device=auto found a GPU); use sampling.dtype=bfloat16 "
                              "or device=cpu")
        if cfg.keep_freed_memory:
            keep_freed_memory()
        policy, tok = build_policy(cfg.model, cfg.seed, dist.device)
        a, o = cfg.algo, cfg.optim
        reference = build_reference(cfg, policy, dist.device) if settings.uses_reference else None
        critic = build_critic(policy, shared=a.critic == "shared", seed=cfg.seed) if settings.needs.critic else None
    extra = {"critic": critic.module} if critic is not None else {}
    parallel = Parallel.wrap(policy, extra, dist, cfg.parallel)
    optimizer, scheduler = build_optimizer(o, policy, critic, a.critic_lr)
    kl_ctl = build_kl_controller(a)
    stream = PromptStream(train_prompts, seed=cfg.seed)
    return Components(settings, parallel.policy, tok, optimizer, scheduler, scorers, stream, eval_prompts, kl_ctl,
                      parallel, reference, critic, extra)


def build_reference(cfg: TrainConfig, policy: torch.nn.Module, device: torch.device) -> ReferencePolicy:
    """The KL's reference: the policy as built (``algo.kl_reference`` null), else that model, frozen."""
    name = cfg.algo.kl_reference
    if name is None:
        return ReferencePolicy(policy)
    try:
        other, _ = build_policy(ModelConfig(name=name, dtype=cfg.model.dtype), cfg.seed, device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"algo.kl_reference={name!r} cannot be loaded: {e}") from e
    if other.get_output_embeddings().weight.shape != policy.get_output_embeddings().weight.shape:
        raise ConfigError(f"algo.kl_reference={name!r} has another vocabulary than model.name={cfg.model.name!r}; "
                          "the KL compares the two models token by token: give a model with the same tokenizer")
    return ReferencePolicy(other)


def build_kl_controller(a: AlgoConfig):
    """The KL coefficient's controller: adaptive (Ziegler et al. 2019) with a target, else fixed."""
    if a.kl_target is not None:
        return core.AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
    return core.FixedKLController(a.kl_coef)


def build_optimizer(o: OptimConfig, policy: torch.nn.Module, critic: Critic | None, critic_lr: float | None):
    """(AdamW, warm-up scheduler) over the policy's trainable parameters and the critic's own.

    Built after ``Parallel.wrap``: FSDP2 replaces the parameters with their shards.  Plain
    float tensors get the fused AdamW kernel (one pass over each parameter: 0.35 -> 0.09 s per
    step for SmolLM2-135M on 2 CPU cores); sharded (DTensor) parameters the multi-tensor one.
    """
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": o.lr}]
    if critic is not None:
        groups.append({"params": list(critic.own_parameters()), "lr": critic_lr or 10 * o.lr})
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) is torch.nn.Parameter and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)
    warm = max(o.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
    return optimizer, scheduler
