"""`seqpg explain`: one prompt and completion, token by token, under a checkpoint.

For each completion token y_t the table shows log pi(y_t | x, y_<t), the advantage A_t, their
product (the token's share of the utility U = sum_t log pi * A) and the direction in which one
gradient step on L = -U moves that token's probability (raises it when A_t > 0).

The advantage is estimated the way the run estimates it, by the training step's own stages
(:func:`seqpg.training.step.score` and :func:`seqpg.training.step.judge`): the completion is scored and joined by a
fresh group of samples for the same prompt (its baseline for group estimators, or the run's
critic for actor-critic runs), and a KL penalty to the reference is applied with the coefficient
of the checkpoint's step.

A multi-turn run (``episode.env`` / ``episode.tools``) is explained on a sampled episode: every token of
it is listed, the environment's (tool results, feedback, the user's replies, template tokens) greyed
out as context: they are read by the model, never trained on, and have no log pi * A.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import core
from ..batch import Prompt, RolloutBatch
from ..training.build import build_kl_controller, build_policy, build_prompts, build_scorers
from ..config import TrainConfig
from ..training.critic import build_critic
from ..devices import resolve_device
from .export import exported_step
from ..training.reference import ReferencePolicy
from ..model.policy import completion_logprobs
from .session import is_run_dir, load_run_checkpoint, resolve_target_config
from ..training.step import Judged, Scored, StepSettings, judge, score
from ..rewards.tasks import normalise_prompt_text


@dataclass
class Explanation:
    prompt: str
    completion: str
    reward: float
    group_rewards: list[float]
    tokens: list[str]
    contributions: core.TokenContributions  # rows of a (1, C) batch
    step: int
    actions: list[bool] | None = None
    """Per token: written by the model (True) or context from the environment (False); None: all actions."""

    def is_action(self, t: int) -> bool:
        return self.actions is None or self.actions[t]

    @property
    def utility(self) -> float:
        return float(self.contributions.contribution_BT.sum())


@dataclass
class RunJudge:
    """A run's way of judging a rollout, loaded from its directory: the policy at the latest checkpoint,
    the reference (the initial policy), the critic, the scorers and the KL coefficient of that step.

    For a model directory (no run), the policy is the model, the reference a copy of it (so a KL
    penalty is 0) and the KL coefficient the configuration's initial one.
    """

    cfg: TrainConfig
    settings: StepSettings
    model: torch.nn.Module
    tokenizer: Any
    scorers: list
    reference: ReferencePolicy | None
    critic: Any
    kl_coef: float
    step: int

    @classmethod
    def load(cls, target: str) -> "RunJudge":
        cfg = resolve_target_config(target)
        st = StepSettings.from_config(cfg)
        scorers = build_scorers(cfg.rewards)
        model, tok = build_policy(cfg.model, cfg.seed, resolve_device(cfg.device))  # the initial policy
        reference = ReferencePolicy(model) if st.uses_reference else None  # before the trained weights load
        critic = build_critic(model, shared=cfg.algo.critic == "shared", seed=cfg.seed) if st.needs.critic else None
        kl_ctl = build_kl_controller(cfg.algo)
        state = load_run_checkpoint(target, model, {"critic": critic.module} if critic is not None else None)
        step = exported_step(target) or 0
        if state is not None:
            step = state["step"]
            kl_ctl.load_state_dict(state["kl_controller"])
        model.eval()
        return cls(cfg, st, model, tok, scorers, reference, critic, kl_ctl.value, step)

    def judge(self, rollout: RolloutBatch, prompts: list[Prompt], *, reward: float | None = None) -> tuple[Scored, Judged]:
        """Score ``rollout`` and estimate its advantages exactly as the run's step does (:mod:`seqpg.training.step`);
        ``reward`` replaces row 0's reward (the other rows are scored, a failing scorer giving 0)."""
        st = self.settings if reward is None else replace(self.settings, on_scorer_error="zero")
        device = self.model.device if hasattr(self.model, "device") else "cpu"
        with st.autocast(device):
            try:
                scored = score(self.model, self.tokenizer, rollout, prompts, self.scorers, st)
            except Exception as e:  # a scorer that needs task data the typed prompt lacks
                raise ValueError(f"could not score the completion ({e}); pass --reward R to give its reward") from e
            if reward is not None:
                scored.batch.rewards_B[0] = reward
            judged = judge(rollout, scored, st, kl_coef=self.kl_coef, reference=self.reference, critic=self.critic,
                           policy=self.model)
        return scored, judged


def explain(target: str, prompt_text: str, completion: str | None = None, *, reward: float | None = None,
            seed: int = 0) -> Explanation:
    """One completion of ``prompt_text`` token by token, its advantage estimated the run's way against a
    fresh group of samples of the same prompt (``seed``)."""
    j = RunJudge.load(target)
    cfg, s = j.cfg, j.settings.sample
    train_p, eval_p = build_prompts(cfg.task)
    known = {normalise_prompt_text(p.text): p for p in train_p + eval_p}
    prompt = known.get(normalise_prompt_text(prompt_text), Prompt(text=prompt_text, id="explain"))
    n, rollouts = max(2, j.settings.samples_per_prompt), j.settings.rollouts
    with j.settings.autocast(j.model.device):
        gen = torch.Generator().manual_seed(seed)
        rollout = rollouts.sample(j.model, j.tokenizer, [prompt], n=n, seeds=[seed], generator=gen)
    if completion is not None:
        rollout = rollouts.with_completion(rollout, j.tokenizer, completion)
    scored, judged = j.judge(rollout, [prompt], reward=reward)
    row = rollout.select([0])
    with torch.no_grad():
        lp = completion_logprobs(j.model, row, temperature=s.temperature).logprobs_BC
    contrib = core.token_contributions(lp, judged.advantages_BC[:1], row.completion_mask_BC)
    L = int(row.span_lengths_B[0])  # through the last action: an episode's environment tokens included
    tokens = [j.tokenizer.decode([i]) for i in row.completion_ids_BC[0, :L].tolist()]
    rewards_B = rollouts.reported_rewards(scored.batch)
    actions = row.completion_mask_BC[0, :L].tolist()
    return Explanation(prompt.text, rollouts.transcript(rollout, j.tokenizer, 0), float(rewards_B[0]),
                       rewards_B.tolist(), tokens, contrib, j.step, None if all(actions) else actions)


_ARROW = {1: "raises", -1: "lowers", 0: "-"}


def render_table(e: Explanation) -> str:
    c = e.contributions
    lines = [f"prompt: {e.prompt!r}", f"completion: {e.completion!r}",
             f"reward {e.reward:+.3f}; group rewards {', '.join(f'{r:+.2f}' for r in e.group_rewards)}; "
             f"checkpoint step {e.step}", "",
             f"{'t':>3}  {'token':<16} {'log pi':>8} {'A':>8} {'log pi*A':>9}  update"]
    for t, token in enumerate(e.tokens):
        if not e.is_action(t):
            lines.append(f"{t:>3}  {repr(token)[:16]:<16} {'':>8} {'':>8} {'':>9}  context")
            continue
        lines.append(f"{t:>3}  {repr(token)[:16]:<16} {float(c.logprob_BT[0, t]):8.3f} "
                     f"{float(c.advantage_BT[0, t]):8.3f} {float(c.contribution_BT[0, t]):9.3f}  "
                     f"{_ARROW[int(c.direction_BT[0, t])]}")
    lines.append(f"U = sum of log pi * A = {e.utility:.4f}")
    return "\n".join(lines)


def render_html(e: Explanation) -> str:
    """A self-contained page: tokens coloured green (raised) / red (lowered), deeper for larger |log pi*A|."""
    c = e.contributions
    scale = max(float(c.contribution_BT.abs().max()), 1e-9)
    spans, rows = [], []
    for t, token in enumerate(e.tokens):
        if not e.is_action(t):  # the environment's tokens: read by the model, never trained on
            spans.append(f'<span class="tok ctx" title="t={t} context from the environment (not trained on)">'
                         f"{html.escape(token)}</span>")
            rows.append(f'<tr class="ctx"><td>{t}</td><td><code>{html.escape(repr(token))}</code></td>'
                        "<td></td><td></td><td></td><td>context</td></tr>")
            continue
        lp, a, k = float(c.logprob_BT[0, t]), float(c.advantage_BT[0, t]), float(c.contribution_BT[0, t])
        d = int(c.direction_BT[0, t])
        alpha = 0.15 + 0.75 * abs(k) / scale if d else 0.0
        rgb = "34,160,70" if d > 0 else "210,50,50"
        tip = f"t={t} log pi={lp:.3f} A={a:.3f} log pi*A={k:.3f} ({_ARROW[d]})"
        spans.append(f'<span class="tok" style="background: rgba({rgb},{alpha:.2f})" title="{html.escape(tip)}">'
                     f"{html.escape(token)}</span>")
        rows.append(f"<tr><td>{t}</td><td><code>{html.escape(repr(token))}</code></td><td>{lp:.3f}</td>"
                    f"<td>{a:.3f}</td><td>{k:.3f}</td><td>{_ARROW[d]}</td></tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>seqpg explain</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;line-height:1.5}}
.tok{{white-space:pre-wrap;border-radius:3px;padding:1px 0;font-family:monospace}}
table{{border-collapse:collapse}}td,th{{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}}
.legend span{{padding:2px 6px;border-radius:3px}}
.ctx{{color:#999;background:#f0f0f0}}</style></head><body>
<h1>seqpg explain</h1>
<p><b>Prompt</b>: {html.escape(e.prompt)}</p>
<p><b>Reward</b> {e.reward:+.3f} (group: {', '.join(f'{r:+.2f}' for r in e.group_rewards)}), checkpoint step {e.step};
<b>U</b> = &Sigma;<sub>t</sub> log &pi; &middot; A = {e.utility:.4f}</p>
<p class="legend"><span style="background:rgba(34,160,70,.6)">raised by the update (A &gt; 0)</span>
<span style="background:rgba(210,50,50,.6)">lowered (A &lt; 0)</span>
<span class="ctx">context from the environment (not trained on)</span> &mdash; deeper colour: larger |log &pi; &middot; A|.
Hover a token for its numbers.</p>
<div style="border:1px solid #ccc;padding:1em;border-radius:6px">{''.join(spans)}</div>
<h2>Per token</h2><table><tr><th>t</th><th>token</th><th>log &pi;</th><th>A</th><th>log &pi; &middot; A</th>
<th>update</th></tr>{''.join(rows)}</table></body></html>
"""


def explain_cli(args) -> int:
    e = explain(args.run, args.prompt, args.completion, reward=args.reward, seed=args.seed)
    print(render_table(e))
    page = Path(args.html) if args.html else (Path(args.run) / "explain.html" if is_run_dir(args.run)
                                              else Path("explain.html"))
    page.write_text(render_html(e))
    print(f"HTML: {page}")
    return 0
