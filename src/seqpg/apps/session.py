"""Loading what a user points at: a run directory (config + latest checkpoint) or a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.build import build_policy, build_prompts, build_scorers
from ..rundir.checkpoint import latest_checkpoint, load_checkpoint
from ..config import TrainConfig, load_config
from ..devices import resolve_device
from ..rollout.interface import rollouts_from_config
from ..training.evaluate import EvalResult, evaluate_as_configured
from .export import EXPORT_CONFIG, exported_step


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def resolve_target_config(target: str, config: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The run's own configuration, or (for a model) the given/default one with model.name=target.

    A model directory written by ``seqpg export`` carries its run's configuration: that is the
    default there (adapters merged, so ``model.lora_r=0``)."""
    overrides = list(overrides or [])
    if is_run_dir(target):
        return load_config(config or Path(target) / "config.yaml", overrides)
    exported = Path(target) / EXPORT_CONFIG
    if exported.is_file():
        return load_config(config or exported, [f"model.name={target}", "model.lora_r=0"] + overrides)
    return load_config(config, overrides + [f"model.name={target}"])


def load_policy_for(target: str, cfg: TrainConfig, device: torch.device | None = None):
    """(model, tokenizer, step): a run's latest checkpoint, or the model as it is (step 0, or the
    step an exported model was taken at); on
    ``device``, by default the configuration's (``device: auto`` is CUDA when visible)."""
    device = device or resolve_device(cfg.device)
    model, tok = build_policy(cfg.model, cfg.seed, device)
    state = load_run_checkpoint(target, model)
    model.eval()
    return model, tok, state["step"] if state is not None else exported_step(target) or 0


def load_run_checkpoint(target: str, model, extra_modules: dict | None = None) -> dict | None:
    """For a run directory: its latest intact checkpoint loaded into ``model`` (and ``extra_modules``, e.g. the
    critic), the global RNG streams left alone; its trainer state.  None for a model (nothing to load)."""
    if not is_run_dir(target):
        return None
    ckpt = latest_checkpoint(target)  # verified here, so not again when loaded
    if ckpt is None:
        raise FileNotFoundError(f"{target}: a run directory without checkpoints (train it first, or pass "
                                f"the model instead)")
    return load_checkpoint(ckpt, model=model, extra_modules=extra_modules, restore_rng=False, verify=False)


@dataclass
class EvalReport:
    target: str
    step: int
    result: EvalResult

    def table(self) -> str:
        r = self.result
        lines = [f"{self.target} (step {self.step}): {r.n_prompts} held-out prompts, {r.seconds:.0f} s",
                 f"  mean reward  {r.mean_reward:+.3f} ± {r.se_reward:.3f} (s.e.)"]
        if r.accuracy is not None:
            lines.append(f"  accuracy     {100 * r.accuracy:5.1f}% ± {100 * r.se_accuracy:.1f}%")
        for name, v in r.per_scorer.items():
            lines.append(f"  {name:<12} {v:+.3f}")
        if r.sampled_reward is not None:
            c = r.sampled_collapse
            lines.append(f"  sampled      {r.sampled_reward:+.3f} ± {r.se_sampled_reward:.3f} (s.e.; "
                         f"{len(r.sampled_completions) // r.n_prompts} per prompt; distinct-2 "
                         f"{c['collapse/distinct_2']:.2f})")
        for k, v in r.pass_at_k.items():
            lines.append(f"  pass@{k:<7} {100 * v:5.1f}%")
        lines.append(f"  mean length  {r.mean_length:.1f} tokens")
        return "\n".join(lines)


def eval_target(target: str, *, config: str | None = None, overrides: list[str] | None = None, n_prompts: int = 0,
                ks: tuple[int, ...] = (), samples: int = 0) -> EvalReport:
    cfg = resolve_target_config(target, config, overrides)
    rollouts = rollouts_from_config(cfg)  # the environment and tools load, and are checked, before the model
    scorers = build_scorers(cfg.rewards)
    _, held_out = build_prompts(cfg.task)
    prompts = held_out[:n_prompts] if n_prompts else held_out
    model, tok, step = load_policy_for(target, cfg)
    return EvalReport(target, step, evaluate_as_configured(cfg, model, tok, prompts, scorers, ks=ks, samples=samples,
                                                           rollouts=rollouts))

