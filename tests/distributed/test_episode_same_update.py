"""Multi-turn episodes: one step with 2 processes equals one step with 1 process (see test_same_update).

Each process samples its half of the prompts' episodes; with ``sampling.seed_per_prompt`` each prompt's
episodes come from its own generator and every environment is reset with a seed of (seed, step, the
prompt's index in the global batch), so both runs play the same episodes, environment replies included.
"""

from __future__ import annotations

import json

import pytest

from dist_helpers import HERE, torchrun
from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train
from test_same_update import _assert_same_metrics, _assert_same_weights, _weights

EPISODE = ["rewards=[]", "episode.env=seqpg_test_envs:EchoEnv", "episode.max_episode_tokens=300",
           "sampling.chat_template=true", "sampling.seed_per_prompt=true", "steps=1"]
CASES = {"grpo": ["algo.name=grpo"],
         "ppo_shared_critic_kl": ["algo.name=ppo", "algo.critic=shared", "algo.kl_coef=0.05", "algo.kl_mode=loss",
                                  "optim.micro_batch_size=3"]}


@pytest.fixture(scope="module")
def episode_runs(overrides, dist_tmp):
    for name, extra in CASES.items():
        train(load_config(None, overrides(*EPISODE, *extra, run=f"one/ep_{name}")), progress=False)
    jobs = [{"overrides": overrides(*EPISODE, *extra, run=f"two/ep_{name}")} for name, extra in CASES.items()]
    (dist_tmp / "episode_jobs.json").write_text(json.dumps(jobs))
    launch = torchrun(2, str(HERE / "run_configs.py"), str(dist_tmp / "episode_jobs.json"),
                      log_dir=dist_tmp / "logs-episodes")
    assert launch.returncode == 0, launch.output[-4000:]
    errors = sorted(p.read_text() for p in (dist_tmp / "two").glob("ep_*/error-rank*.json"))
    assert not errors, errors
    return dist_tmp


@pytest.mark.parametrize("case", sorted(CASES))
def test_episode_step_with_two_processes_equals_one_process(case, episode_runs):
    one, two = episode_runs / "one" / f"ep_{case}", episode_runs / "two" / f"ep_{case}"
    _assert_same_weights(_weights(one, 1), _weights(two, 1))
    rows_one = read_jsonl(one / "metrics.jsonl")
    _assert_same_metrics(rows_one, read_jsonl(two / "metrics.jsonl"))
    assert rows_one[0]["episode/turns"] == 3 and rows_one[0]["grad_norm"] > 0
    sa = [(s["prompt_id"], s["turns"]) for s in read_jsonl(one / "samples.jsonl")]
    sb = [(s["prompt_id"], s["turns"]) for s in read_jsonl(two / "samples.jsonl")]
    assert sa == sb and len(sa) == 16
