"""One step with 2 processes equals one step with 1 process, for the same seed and global batch.

Each process samples and scores half of the prompts; with ``sampling.seed_per_prompt`` each
prompt's samples come from its own generator, so both runs see the same tokens.  Batch
statistics, loss normalisers and gradients are summed over processes, so the parameters after
the step, and every logged metric, must agree to float tolerance.

Adam's first step is ``lr * g / (|g| + eps)``: nearly ``lr * sign(g)``, blind to the scale of the
gradient, and it amplifies float noise on the few components whose gradient is near zero.  So
parameters are compared to 1e-3 (a component with the wrong sign moves by 2 lr = 0.06), and the
scale is checked through the logged ``grad_norm`` and losses, to 1e-5 relative: a process-count
factor (averaged rather than summed gradients, local rather than global counts) shows there.

All 2-process runs share one ``torchrun`` launch (``run_configs.py``) to pay start-up once.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dist_helpers import HERE, torchrun
from seqpg.rundir.checkpoint import full_model_state
from seqpg.config import load_config
from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train

# A dense reward, so that every group has non-zero advantages whatever the samples happen to be.
DENSE = "rewards=[{kind: callable, params: {fn: 'dist_test_rewards:char_code_mean'}}]"
# Letters end a completion: completions stop after a few tokens (stop strings, variable lengths).
STOP_LETTERS = "sampling.stop_strings=[" + ", ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN") + "]"

CASES = {
    "grpo": ["algo.name=grpo"],
    "reinforce_pp": ["algo.name=reinforce_pp", "optim.micro_batch_size=3"],  # batch-whitened; accumulation
    "a2c": ["algo.name=a2c", "optim.micro_batch_size=3", "algo.whiten=true"],  # GAE, separate critic, whitened
    "ppo_shared_critic_kl": ["algo.name=ppo", "algo.critic=shared", "algo.kl_coef=0.05", "algo.kl_mode=loss"],
    "grpo_fsdp2": ["algo.name=grpo", "parallel=fsdp2", "optim.micro_batch_size=3", "sampling.max_new_tokens=10",
                   STOP_LETTERS],
    "a2c_fsdp2": ["algo.name=a2c", "parallel=fsdp2"],
    "ppo_bf16_sampler": ["algo.name=ppo", "sampling.dtype=bfloat16", "algo.kl_coef=0.05"],  # mismatch/* summed
    "lora_fsdp2": ["algo.name=grpo", "parallel=fsdp2", "model.lora_r=8", "model.lora_alpha=16",
                   "model.lora_target_modules=[lm_head, q_proj, v_proj]"],
}
RESUMED = ("a2c_fsdp2", "lora_fsdp2")  # continued for a second step by 2 processes from a 1-process (sharded) checkpoint
TIMING = ("time/", "tokens_per_s", "wall_time")
NOISE = "gns/"
"""The gradient noise scale fits the norms of the gradients each process accumulates over its own micro-batches
(seqpg.training.gradnoise): an unbiased estimate either way, but of other partial batches with 2 processes, so
not equal to 1 process's; and none under FSDP2. Checked apart (``test_ddp_logs_the_gradient_noise_scale``)."""


@pytest.fixture(scope="module")
def runs(overrides, dist_tmp):
    """Every case with 1 process (here) and 2 processes (one launch); plus FSDP2 resumes.

    A resume: the 1-process checkpoint of a case after step 1 is continued for one step by 2
    FSDP2 processes (full tensors loaded into shards, Adam state included) and compared with a
    1-process run of 2 steps.
    """
    common = ["sampling.seed_per_prompt=true", DENSE, "steps=1"]
    for name, extra in CASES.items():
        train(load_config(None, overrides(*common, *extra, run=f"one/{name}")), progress=False)
    jobs = [{"overrides": overrides(*common, *extra, run=f"two/{name}")} for name, extra in CASES.items()]
    for name in RESUMED:
        two_steps = ["sampling.seed_per_prompt=true", DENSE, *CASES[name], "steps=2"]
        train(load_config(None, overrides(*two_steps, "save_every=1", run=f"one/{name}_2")), progress=False)
        shutil.copytree(dist_tmp / "one" / name, dist_tmp / "two" / f"{name}_resumed")
        jobs.append({"overrides": overrides(*two_steps, run=f"two/{name}_resumed"), "resume": True})
    (dist_tmp / "jobs.json").write_text(json.dumps(jobs))
    launch = torchrun(2, str(HERE / "run_configs.py"), str(dist_tmp / "jobs.json"), log_dir=dist_tmp / "logs-same")
    assert launch.returncode == 0, launch.output[-4000:]
    errors = sorted(p.read_text() for p in (dist_tmp / "two").glob("*/error-rank*.json"))
    assert not errors, errors
    return dist_tmp


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    """Every module's weights (LoRA: the adapters only), whole, from a full or a sharded (FSDP2) checkpoint."""
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    modules = ["policy", *json.loads((ckpt / "meta.json").read_text())["extra_modules"]]
    return {f"{m}.{k}": v for m in modules for k, v in full_model_state(ckpt, m).items()}


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-3) -> None:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: float((a[k] - b[k]).abs().max()))
    assert torch.allclose(a[worst], b[worst], atol=atol, rtol=0), (worst, float((a[worst] - b[worst]).abs().max()))


def _assert_same_metrics(rows_a: list[dict], rows_b: list[dict]) -> None:
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        keys = {k for k in ra if not k.startswith((*TIMING, NOISE))}
        assert keys == {k for k in rb if not k.startswith((*TIMING, NOISE))}
        for k in sorted(keys):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k, ra[k], rb[k])


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_with_two_processes_equals_one_process(case, runs):
    one, two = runs / "one" / case, runs / "two" / case
    a, b = _weights(one, 1), _weights(two, 1)
    _assert_same_weights(a, b)
    initial = build_tiny_model(len(build_tiny_tokenizer()), seed=0).state_dict()
    initial.update({k.removeprefix("policy."): torch.zeros_like(v)
                    for k, v in a.items() if "lora_B" in k})  # LoRA's B starts at 0
    moved = max(float((a[f"policy.{k}"] - v).abs().max()) for k, v in initial.items() if f"policy.{k}" in a)
    assert moved > 1e-2  # the step did something (lr 3e-2): equality is not that of two no-ops
    _assert_same_metrics(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))
    # samples are gathered from both processes into one file, in the order of the global batch
    sa = [(s["prompt_id"], s["completion"]) for s in read_jsonl(one / "samples.jsonl")]
    sb = [(s["prompt_id"], s["completion"]) for s in read_jsonl(two / "samples.jsonl")]
    assert sa == sb and len(sa) == 16


@pytest.mark.parametrize("case", RESUMED)
def test_fsdp2_resumes_a_one_process_checkpoint_exactly(case, runs):
    one, two = runs / "one" / f"{case}_2", runs / "two" / f"{case}_resumed"
    _assert_same_weights(_weights(one, 2), _weights(two, 2))  # a lost or misplaced Adam state: O(lr)
    _assert_same_metrics(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))


@pytest.mark.parametrize("case", ["reinforce_pp", "a2c"])
def test_ddp_logs_the_gradient_noise_scale(case, runs):
    """With micro-batches, both runs log it, and the global |G|^2 part agrees in scale (within a factor 3:
    the two fits use different partial batches of the same 16 samples)."""
    (a,), (b,) = read_jsonl(runs / "one" / case / "metrics.jsonl"), read_jsonl(runs / "two" / case / "metrics.jsonl")
    for m in (a, b):
        assert all(math.isfinite(m[f"gns/{k}"]) for k in ("b_simple", "grad_sq", "trace_cov")), m
        assert m["gns/trace_cov"] > 0
    assert "gns/b_simple" not in read_jsonl(runs / "two" / "grpo_fsdp2" / "metrics.jsonl")[0]  # FSDP2: none
