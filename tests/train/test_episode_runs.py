"""Multi-turn episodes in training (``episode.env`` / ``episode.tools``) on the tiny model: every family runs,
environment tokens reach no gradient, sampler = trainer log-probs, exact resume, bad input refused early."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import seqpg.model.policy as policy_mod
from seqpg.config import ConfigError, load_config
from seqpg.model.policy import completion_logprobs
from seqpg.training.build import build_components
from seqpg.training.distributed import DistContext
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.step import judge, sample, score
from seqpg.training.trainer import train
from seqpg.training.update import update

from resume_runs import full_and_resumed
from resume_runs import maths as _maths

ENVS = Path(__file__).resolve().parents[2] / "examples" / "envs"
EPISODE = ["rewards=[]", "episode.env=seqpg_test_envs:EchoEnv", "episode.max_episode_tokens=300",
           "sampling.chat_template=true", "sampling.prompts_per_step=2", "sampling.samples_per_prompt=3"]


@pytest.fixture
def episode_overrides(tiny_overrides):
    def make(*extra: str, run: str = "run") -> list[str]:
        return tiny_overrides(*EPISODE, *extra, run=run)
    return make


@pytest.mark.parametrize("family", ["grpo", "rloo", "ppo", "remax", "reinforce_pp"])
def test_every_family_trains_on_episodes(family, episode_overrides):
    result = train(load_config(None, episode_overrides(f"algo.name={family}", "steps=2")), progress=False)
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["episode/turns"] == 3 and r["episode/done_frac"] == 1.0 and 0 < r["episode/context_frac"] < 1
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        assert "collapse/distinct_2" in r and "collapse/shared_opening" not in r  # single-turn runs only
        assert "gns/b_simple" in r  # the default split measures the noise scale on episodes too
    assert any(r["grad_norm"] > 0 for r in rows) and rows[0]["reward/env"] > 0
    sample_row = read_jsonl(result.run_dir / "samples.jsonl")[0]
    assert len(sample_row["turns"]) == 3 and sample_row["completion"] == sample_row["turns"][-1]["text"]


def test_scorers_and_environment_rewards_add_up(episode_overrides):
    """A scorer on the final turn (weighted) plus the environment's per-turn rewards: the logged return."""
    cfg = load_config(None, episode_overrides(
        "rewards=[{kind: callable, weight: 2.0, params: {fn: 'seqpg_test_rewards:target_fraction'}}]",
        "episode.env_weight=0.5"))
    c = build_components(cfg, DistContext.from_env("cpu", "auto", 60))
    rollout = sample(c.policy, c.tokenizer, c.stream.take(2), c.settings, step=1)
    scored = score(c.policy, c.tokenizer, rollout, rollout.prompts[::3], c.scorers, c.settings).batch
    from seqpg.batch import total_rewards

    tok_BC = total_rewards(scored)
    want_B = 2.0 * scored.scores["callable"] + 0.5 * scored.scores["env"]
    torch.testing.assert_close(tok_BC.sum(1), want_B)
    assert (tok_BC[~rollout.completion_mask_BC] == 0).all()  # rewards sit on model tokens only
    assert float(scored.scores["env"].abs().sum()) > 0


def _components(episode_overrides, *extra):
    cfg = load_config(None, episode_overrides(*extra))
    return cfg, build_components(cfg, DistContext.from_env("cpu", "auto", 60))


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_sampler_logprobs_equal_trainer_logprobs_on_episodes(episode_overrides, monkeypatch, layout):
    if layout == "padded":
        monkeypatch.setattr(policy_mod, "_takes_per_row_logits_to_keep", lambda: False)
    _, c = _components(episode_overrides, "sampling.temperature=0.7")
    rollout = sample(c.policy, c.tokenizer, c.stream.take(2), c.settings, step=1)
    assert rollout.episodes is not None and rollout.env_rewards_BC is not None
    holes = rollout.span_mask_BC & ~rollout.completion_mask_BC
    assert bool(holes.any())  # environment tokens inside the completions
    with torch.no_grad():
        lp_BC = completion_logprobs(c.policy, rollout, temperature=0.7).logprobs_BC
    act = rollout.completion_mask_BC
    torch.testing.assert_close(lp_BC[act], rollout.sample_logprobs_BC[act], atol=1e-5, rtol=0)
    ids = [ep.token_ids[ep.prompt_len:] for ep in rollout.episodes]  # the kept ids, exactly
    assert all(rollout.completion_ids_BC[i, :len(t)].tolist() == t for i, t in enumerate(ids))


def _update_deltas(cfg, c, rollout, scored, noise_on: str, seed: int = 0) -> list[torch.Tensor]:
    """Parameter changes of one SGD update (lr 1) with noise added to the logits and the critic's values
    at the columns that predict ``noise_on`` tokens ("context" or "action") of the padded layout."""
    st = c.settings
    params = [p for p in c.policy.parameters()] + list(c.critic.own_parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    judged = judge(rollout, scored, st, kl_coef=0.1, reference=c.reference, critic=c.critic)
    act_BC = rollout.completion_mask_BC
    where_BC = ~act_BC if noise_on == "context" else act_BC
    gen = torch.Generator().manual_seed(seed)

    def noisy(_m, _inp, out):
        assert out.shape[1] == where_BC.shape[1] + 1  # padded layout: C + 1 kept columns, the last unused
        n_BC = torch.cat([where_BC, torch.zeros_like(where_BC[:, :1])], 1)
        return out + torch.randn(out.shape, generator=gen) * 3.0 * n_BC[..., None]

    def noisy_values(_m, _inp, out):
        return out + torch.randn(out.shape, generator=gen) * 3.0 * where_BC

    handles = [c.policy.lm_head.register_forward_hook(noisy),
               c.critic.module.head.register_forward_hook(noisy_values)]
    try:
        update(c.policy, opt, judged.train_batch(rollout, st), st.update, kl_loss_coef=judged.kl_loss_coef(st),
               critic=c.critic, max_len=st.max_completion_tokens)
    finally:
        for h in handles:
            h.remove()
    deltas = [p.detach() - b for p, b in zip(params, before)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return deltas


def test_environment_positions_reach_no_gradient(episode_overrides, monkeypatch):
    """Noise on the logits (so on U, the KL loss term and the entropy bonus) and on the critic's values at
    every column predicting an environment token changes no parameter update; the same noise at action
    columns does (the test can fail)."""
    monkeypatch.setattr(policy_mod, "_takes_per_row_logits_to_keep", lambda: False)  # padded: column j -> token j
    cfg, c = _components(episode_overrides, "algo.name=ppo", "algo.kl_mode=loss", "algo.kl_coef=0.1",
                         "algo.entropy_coef=0.1", "algo.critic=separate", "optim.max_grad_norm=0",
                         "optim.grad_noise=false")  # one forward over the whole batch: the hook's layout
    torch.manual_seed(0)
    rollout = sample(c.policy, c.tokenizer, c.stream.take(2), c.settings, step=1)
    scored = score(c.policy, c.tokenizer, rollout, rollout.prompts[::3], c.scorers, c.settings)
    clean = _update_deltas(cfg, c, rollout, scored, "context", seed=0)
    again = _update_deltas(cfg, c, rollout, scored, "context", seed=1)
    for a, b in zip(clean, again):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert sum(float(d.abs().sum()) for d in clean) > 0
    hit = _update_deltas(cfg, c, rollout, scored, "action", seed=1)
    assert max(float((a - b).abs().max()) for a, b in zip(clean, hit)) > 1e-3


@pytest.mark.parametrize("family", ["grpo", "ppo"])
def test_resume_replays_episodes_exactly(family, episode_overrides):
    """The environments' RNG (the replies) and the sampler's are restored: resumed = uninterrupted."""
    extra = [f"algo.name={family}", "steps=4", "algo.kl_coef=0.05"]
    full, resumed = full_and_resumed(episode_overrides, *extra, stop_at=2)
    assert _maths(read_jsonl(full.run_dir / "metrics.jsonl")) == _maths(read_jsonl(resumed.run_dir / "metrics.jsonl"))
    sa = [(r["step"], r["turns"]) for r in read_jsonl(full.run_dir / "samples.jsonl")]
    sb = [(r["step"], r["turns"]) for r in read_jsonl(resumed.run_dir / "samples.jsonl")]
    assert sa == sb and len(sa) == 4 * 6


def test_group_episodes_start_from_the_same_state(episode_overrides):
    _, c = _components(episode_overrides)
    rollout = sample(c.policy, c.tokenizer, c.stream.take(2), c.settings, step=1)
    seeds = [ep.seed for ep in rollout.episodes]
    assert seeds[:3] == [seeds[0]] * 3 and seeds[3:] == [seeds[3]] * 3 and seeds[0] != seeds[3]
    assert rollout.group_ids_B.tolist() == [0, 0, 0, 1, 1, 1]


def test_example_environments_train(episode_overrides):
    """The calculator (with a tool), the feedback and the simulated-user environments each run a step.  (The
    tool's description alone would fill the tiny model's 512 positions under the chat template, so the
    calculator runs without it; tests/rollout run the calculator with its template and ``calculate``.)"""
    for env, tools, params, template in [("calculator.py:CalculatorEnv", ["seqpg_test_envs:add"], "{}", "false"),
                                         ("feedback.py:FeedbackEnv", [], "{max_tries: 2}", "true"),
                                         ("simulated_user.py:SimulatedUserEnv", [], "{patience: 1}", "true")]:
        tools_arg = "[" + ", ".join(f"'{t}'" for t in tools) + "]"
        cfg = load_config(None, episode_overrides(
            f"episode.env={ENVS}/{env}", f"episode.tools={tools_arg}", f"episode.env_params={params}",
            "episode.max_episode_tokens=512", "episode.max_turns=2", "steps=1", f"sampling.chat_template={template}",
            run=env.split(".")[0]))
        rows = read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")
        assert rows[0]["episode/turns"] >= 1 and math.isfinite(rows[0]["loss"])


def test_a_file_environment_is_executed_once_per_run(episode_overrides, tmp_path):
    """The environment file is loaded once: by the step's settings, not again by the configuration's check,
    the held-out evaluation or the trainer."""
    marks = tmp_path / "executions.txt"
    env_file = tmp_path / "counted_env.py"
    env_file.write_text(f"with open({str(marks)!r}, 'a') as f:\n    f.write('x')\n"
                        "from seqpg_test_envs import EchoEnv as Counted\n")
    cfg = load_config(None, episode_overrides(f"episode.env={env_file}:Counted", "steps=1", "eval_every=1",
                                              "eval_prompts=2"))
    assert not marks.exists()  # reading the configuration runs no user code
    train(cfg, progress=False)
    assert marks.read_text() == "x"


def test_tools_only_run_scores_the_final_answer(episode_overrides):
    cfg = load_config(None, episode_overrides(
        "episode.env=null", "episode.tools=['seqpg_test_envs:add']", "episode.max_episode_tokens=512",
        "sampling.chat_template=false",
        "rewards=[{kind: callable, params: {fn: 'seqpg_test_rewards:target_fraction'}}]", "steps=1"))
    rows = read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")
    assert rows[0]["episode/turns"] == 1 and "reward/callable" in rows[0]


@pytest.mark.parametrize("override, message", [
    ("episode.env=seqpg_test_envs:Missing", "has no attribute 'Missing'"),
    ("episode.env=no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
    ("episode.env=seqpg_test_envs:NoStep", "lacks step()"),
    ("episode.env=seqpg_test_envs:random", "is a module, not a class"),
    ("episode.env_params={colour: red}", "cannot build it with params"),
    ("episode.tools=['seqpg_test_envs:EchoEnv']", "must be a plain Python function"),
    ("episode.max_turns=0", "episode.max_turns must be at least 1"),
    ("episode.tool_timeout_s=0", "episode.tool_timeout_s must be > 0"),
    ("episode.tool_timeout_s=3000000", "episode.tool_timeout_s must be > 0 and at most 3600"),
    ("episode.tool_max_calls=0", "episode.tool_max_calls must be at least 1"),
    ("episode.tool_max_parallel=0", "episode.tool_max_parallel must be at least 1"),
    ("episode.tool_memory_mb=-1", r"episode.tool_memory_mb must be >= 0 \(0: no limit\)"),
    ("episode.tool_cpu_s=-1", "episode.tool_cpu_s must be >= 0"),
    ("episode.max_episode_tokens=600", "exceeds the model's context of 512"),
])
def test_bad_episode_input_is_refused_before_any_model_loads(episode_overrides, monkeypatch, override, message):
    import seqpg.training.build as build_mod

    monkeypatch.setattr(build_mod, "build_policy", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(ConfigError, match=message):  # the context check reads the model's config only
        build_components(load_config(None, episode_overrides(override)), DistContext.from_env("cpu", "auto", 60))


def test_explain_shows_an_episode_with_environment_tokens_as_context(episode_overrides, capsys):
    from seqpg.apps.cli import main
    from seqpg.apps.explain import explain, render_html, render_table

    run = train(load_config(None, episode_overrides("steps=1", "save_every=1")), progress=False).run_dir
    e = explain(str(run), "cat", seed=3)
    assert e.actions is not None and not all(e.actions) and any(e.actions)
    ctx = [t for t, a in enumerate(e.actions) if not a]
    c = e.contributions
    assert all(float(c.contribution_BT[0, t]) == 0 and float(c.logprob_BT[0, t]) == 0 for t in ctx)
    assert e.utility == pytest.approx(float(c.contribution_BT[0, :len(e.tokens)][torch.tensor(e.actions)].sum()))
    table = render_table(e).splitlines()
    token_rows = table[5:5 + len(e.tokens)]
    assert [r.endswith("context") for r in token_rows] == [not a for a in e.actions]
    page = render_html(e)
    assert page.count('class="tok ctx"') == len(ctx) and page.count('<tr class="ctx">') == len(ctx)
    assert "".join(e.tokens) in e.completion  # the whole episode after the prompt, environment included
    assert main(["explain", str(run), "--prompt", "cat"]) == 0 and "context" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--completion cannot be given for a multi-turn run"):
        explain(str(run), "cat", "aab")


def test_held_out_evaluation_runs_whole_episodes(episode_overrides):
    """eval_every evaluates greedy episodes on held-out prompts; each prompt's environment is reset the same
    way at every evaluation, so an unchanged policy scores the same."""
    from seqpg.training.evaluate import evaluate_as_configured

    cfg = load_config(None, episode_overrides("steps=1", "eval_every=1", "eval_prompts=2", "optim.lr=1e-12"))
    rows = [r for r in read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl") if "eval/reward_mean" in r]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["eval/reward_mean"] == pytest.approx(rows[1]["eval/reward_mean"], abs=1e-6)
    assert rows[0]["eval/reward_mean"] == pytest.approx(rows[0]["eval/scorer/env"]) and rows[0]["eval/reward_mean"] > 0
    _, c = _components(episode_overrides)
    result = evaluate_as_configured(cfg, c.policy, c.tokenizer, c.eval_prompts[:2], c.scorers)
    assert len(result.completions) == 2 and result.mean_length > 6  # several turns' tokens


def test_lab_measures_a_multi_turn_configuration(episode_overrides, tmp_path):
    """The lab samples and scores through the run's rollouts: episodes, their environment rewards dense on
    the model's turns, their context tokens outside the sketch."""
    from seqpg.apps.lab import LabSettings, run_lab

    res = run_lab(load_config(None, episode_overrides()), LabSettings(groups=6, reference_groups=4, directions=8,
                  out_dir=str(tmp_path / "lab"), estimators=["rloo", "remax"]), log=lambda m: None)
    assert res.estimators == ["reinforce", "rloo", "remax"] and res.mean_reward > 0  # EchoEnv's per-turn rewards
    assert (tmp_path / "lab" / "lab.md").is_file()
