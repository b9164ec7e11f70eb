"""`seqpg lab`: measure which advantage estimator a task needs, at a model or a checkpoint.

It draws units, each what one training step sees (``prompts_per_step`` prompts x
``samples_per_prompt`` completions, from the training prompts), scores them once, and from the
same samples computes every estimator's policy-gradient estimate (a paired comparison; the
statistics and their standard errors are :mod:`seqpg.core.gradstats`'s). A reference gradient,
RLOO's (REINFORCE's with one sample per prompt) mean over held-apart units, gives the direction
that bias and cosine are measured along.

The gradient sketch (memory of one step, whatever the model): the per-token score gradient of the
output projection W (V x H; the LM head, in its role as the output layer only when tied to the
input embeddings) at temperature tau,

    d log softmax(W h_t / tau)[y_t] / dW = (e_{y_t} - p_t) h_t^T / tau,

projected on K fixed random rank-one directions R_k = u_k w_k^T / sqrt(K), u_k ~ N(0, I_V),
w_k ~ N(0, I_H): <R_k, G> = u_k^T G w_k / sqrt(K). E[sum_k <R_k, G><R_k, G'>] = <G, G'>, so every
inner product, norm and variance of the statistics is preserved in expectation. Per-token
sketches (B, C, K) are kept for one unit at a time, so per-token advantages (gamma < 1, dense
rewards) are handled exactly; the unit is reduced to its K-vector at once.

Samples and rewards are the run's (its rollouts: completions, or multi-turn episodes whose
environment's tokens are context, outside the sketch): the scorers' weighted total, plus an episode's
per-turn environment rewards (no KL penalty). GAE needs a critic's values and is skipped; ReMax's
baseline is the reward of one greedy sample per prompt, as the training step's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import core
from ..batch import RolloutBatch, total_rewards
from ..training.build import build_policy, build_prompts, build_scorers, seed_everything
from ..config import ConfigError, TrainConfig
from ..devices import resolve_device
from ..model.policy import completion_logprobs, model_device, position_ids_from_mask
from ..rollout.seeding import reset_seeds
from ..training.step import StepSettings, estimator_params
from .session import load_policy_for
from ..rewards.tasks import PromptStream

CAN_FILL = {"baseline": "the reward of one greedy completion per prompt (ReMax)"}
"""Required estimator parameters the lab knows how to supply, and how."""


@dataclass
class LabSettings:
    """What `seqpg lab` measures (command-line options)."""

    groups: int = 32
    """Prompt groups whose estimates are compared (units = groups / prompts_per_step)."""
    reference_groups: int = 32
    """Held-apart prompt groups for the reference gradient."""
    estimators: list[str] | None = None
    """Advantage estimators to compare (default: every registered one the task can use)."""
    directions: int = 128
    """K, random directions of the gradient sketch."""
    cosine: float = 0.5
    """The target cosine to the reference of 'samples to reach cosine c'."""
    seed: int = 0
    """Seed of prompts, sampling and sketch directions."""
    out_dir: str = "lab"
    """Where lab.md, lab.json and plots/ go."""


@dataclass
class LabResult:
    estimators: list[str]
    skipped: dict[str, str]
    stats: core.GradStats
    samples_per_unit: int
    reference: str
    reference_cosine: float
    mean_reward: float
    reward_std: float
    seconds: float
    settings: dict = field(default_factory=dict)


def plan_estimators(requested: list[str] | None, samples_per_prompt: int) -> tuple[list[str], dict[str, str]]:
    """(estimators to run, {skipped name: reason}); REINFORCE first (the variance unit).

    Each estimator is tried on a tiny batch shaped like the task's (groups of ``samples_per_prompt``):
    one that raises (GAE without a critic's values, RLOO with groups of one) or gives every sample
    a zero advantage (a group baseline with one sample per prompt) cannot be measured. A requested
    one that cannot is refused by name (a ``ConfigError``, before any model loads); by default it is
    skipped with the reason.
    """
    names = requested or core.ADVANTAGE_ESTIMATORS.names()
    unknown = [n for n in names if n not in core.ADVANTAGE_ESTIMATORS]
    if unknown:
        raise ConfigError(f"--estimators: unknown {unknown}; valid: {', '.join(core.ADVANTAGE_ESTIMATORS.names())}")
    n = samples_per_prompt
    rewards = torch.arange(2 * n, dtype=torch.float32) % 3 + 0.5
    mask, groups = torch.ones(2 * n, 2, dtype=torch.bool), torch.arange(2).repeat_interleave(n)
    ok, skipped = [], {}
    for name in dict.fromkeys(["reinforce", *names]):
        required = [k for k, d in core.advantage_params(name).items() if d is core.REQUIRED]
        missing = [k for k in required if k not in CAN_FILL]
        try:
            if missing:
                raise ValueError(f"needs {missing}, which the lab cannot supply")
            adv, _ = core.compute_advantages(name, rewards, mask, group_ids=groups,
                                             **{k: torch.zeros(2 * n) for k in required})
            if not adv.any():
                raise ValueError(f"gives every sample a zero advantage with samples_per_prompt={n}")
        except ValueError as e:
            skipped[name] = str(e)
            continue
        ok.append(name)
    refused = {k: v for k, v in skipped.items() if requested and k in requested}
    if refused or "reinforce" in skipped:
        raise ConfigError("lab cannot measure " + "; ".join(f"{k}: {v}" for k, v in (refused or skipped).items()))
    return ok, skipped


class HeadSketch:
    """Per-token sketches (B, C, K) of the output projection's score gradient (module docstring)."""

    def __init__(self, model: torch.nn.Module, directions: int, seed: int) -> None:
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError("the lab's sketch needs a linear output layer without bias (get_output_embeddings)")
        self.W_VH = head.weight.detach().float()
        V, H = self.W_VH.shape
        g = torch.Generator().manual_seed(seed)
        dev = self.W_VH.device
        self.U_VK = torch.randn(V, directions, generator=g).to(dev)
        self.Wd_HK = torch.randn(H, directions, generator=g).to(dev) / math.sqrt(directions)

    def __call__(self, model: torch.nn.Module, rollout: RolloutBatch, temperature: float,
                 check: bool = False) -> torch.Tensor:
        """(B, C, K) float64 on the CPU, 0 on padding. ``check``: compare the head's log-probs with the policy's."""
        mask_BC = rollout.completion_mask_BC
        h_NH = head_inputs(model, rollout)[mask_BC.to(self.W_VH.device)].float()  # (N, H) real tokens only
        lp_NV = (h_NH @ self.W_VH.T / temperature).log_softmax(-1)
        y_N = rollout.completion_ids_BC[mask_BC].to(h_NH.device)
        if check:
            mine = lp_NV.gather(1, y_N[:, None]).squeeze(1).cpu()
            theirs = completion_logprobs(model, rollout, temperature=temperature).logprobs_BC[mask_BC].float().cpu()
            if not torch.allclose(mine, theirs, atol=1e-3, rtol=1e-3):
                raise RuntimeError("the model's last hidden state is not its output layer's input (log-probs "
                                   "differ); the lab's sketch does not apply to this model")
        a_NK = (self.U_VK[y_N] - lp_NV.exp() @ self.U_VK) / temperature
        s_NK = a_NK * (h_NH @ self.Wd_HK)
        out = torch.zeros(*mask_BC.shape, s_NK.shape[1], dtype=torch.float64)  # (B, C, K)
        out[mask_BC] = s_NK.double().cpu()
        return out


def head_inputs(model: torch.nn.Module, rollout: RolloutBatch) -> torch.Tensor:
    """(B, C, H) the output layer's input before each completion token (the trunk's last, normed state).

    The trunk is called directly: asking the whole model for ``output_hidden_states`` makes
    transformers install output-capturing hooks that stay, after which the fast decoder declines
    the model (``fastdecode.supports``) and every later sampling call runs several times slower.
    """
    C = rollout.completion_ids_BC.shape[1]
    batch = rollout.to(model_device(model))
    mask_BL = batch.attention_mask_BL
    with torch.no_grad():
        out = model.get_decoder()(input_ids=batch.input_ids_BL, attention_mask=mask_BL.long(),
                                  position_ids=position_ids_from_mask(mask_BL), use_cache=False)
    return out.last_hidden_state[:, -(C + 1):-1]


def run_lab(cfg: TrainConfig, settings: LabSettings, *, checkpoint: str | None = None,
            log=print) -> LabResult:
    """Measure and write ``settings.out_dir``/lab.md, lab.json, plots/; return the figures."""
    s = cfg.sampling
    P, n = s.prompts_per_step, s.samples_per_prompt
    names, skipped = plan_estimators(settings.estimators, n)
    units, ref_units = max(settings.groups // P, 3), max(settings.reference_groups // P, 2)
    if not 0 < settings.cosine < 1:
        raise ConfigError(f"--cosine must be in (0, 1), got {settings.cosine}")
    st = StepSettings.from_config(cfg)  # the run's rollouts (completions or episodes), as its step samples and scores
    scorers = build_scorers(cfg.rewards)
    train_prompts, _ = build_prompts(cfg.task)
    t0 = time.monotonic()
    seed_everything(settings.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if checkpoint:
        model, tok, step = load_policy_for(checkpoint, cfg, device)
    else:
        (model, tok), step = build_policy(cfg.model, cfg.seed, device), 0
    model.eval()
    sketch = HeadSketch(model, settings.directions, settings.seed)
    stream = PromptStream(train_prompts, seed=settings.seed)
    gen = torch.Generator(device=model_device(model)).manual_seed(settings.seed)
    reference = "rloo" if "rloo" in names else "reinforce"
    g_EUK, ref_UK, all_rewards = [], [], []
    for u in range(units + ref_units):
        prompts = stream.take(P)
        rollout = st.rollouts.sample(model, tok, prompts, n=n, seeds=reset_seeds(settings.seed, u, 0, P), generator=gen)
        scored = st.rollouts.score(rollout, scorers, on_error=st.on_scorer_error, tokenizer=tok)
        rewards, reported_B = total_rewards(scored), st.rollouts.reported_rewards(scored)  # (B,) or (B, C); (B,)
        with torch.no_grad():
            score_BCK = sketch(model, rollout, st.sample.temperature, check=u == 0)
        unit_B = torch.zeros(rollout.batch_size, dtype=torch.long)
        fill = {}
        if "remax" in names and u < units:  # the step's greedy baseline (seqpg.training.step.score)
            fill["baseline"] = st.rollouts.greedy_baseline(model, tok, rollout, prompts, scorers).double()

        def grad(name: str) -> torch.Tensor:
            accepted = core.advantage_params(name)
            params = {**estimator_params(cfg.algo, name), **{k: v for k, v in fill.items() if k in accepted}}
            return core.unit_gradients(name, rewards.double(), rollout.completion_mask_BC, score_BCK, unit_B,
                                       group_ids_B=rollout.group_ids_B, **params)[0]

        if u < units:
            g_EUK.append(torch.stack([grad(name) for name in names]))
            all_rewards.append(reported_B)
        else:
            ref_UK.append(grad(reference))
        log(f"lab: unit {u + 1}/{units + ref_units} ({'compared' if u < units else 'reference'}), "
            f"mean reward {float(reported_B.mean()):+.3f}, {time.monotonic() - t0:.0f} s")
    ref = torch.stack(ref_UK)
    ref_D = ref.mean(0)
    rm = core.Moments.from_sums(ref.sum(0), ref.pow(2).sum(-1).sum(), ref.shape[0])
    ref_sq = float(rm.musq_E)
    ref_cos = math.sqrt(max(ref_sq, 0.0) / (max(ref_sq, 0.0) + float(rm.var_E) / ref.shape[0]))
    try:
        stats = core.sample_stats(torch.stack(g_EUK, dim=1), ref_D, base=names.index("reinforce"),
                                  cosine=settings.cosine, ref_sq=ref_sq)
    except ValueError as e:
        raise ConfigError(f"lab: {e} (--reference-groups {settings.reference_groups})") from e
    r = torch.cat(all_rewards)
    result = LabResult(names, skipped, stats, P * n, reference, ref_cos, float(r.mean()), float(r.std()),
                       time.monotonic() - t0, settings=dict(vars(settings), units=units, reference_units=ref_units,
                                                            model=cfg.model.name, checkpoint=checkpoint, step=step,
                                                            prompts_per_unit=P, samples_per_prompt=n))
    write_report(result, Path(settings.out_dir))
    return result


ROWS = (("bias_factor", "bias factor", "{:.3f}"), ("variance_ratio", "variance / REINFORCE", "{:.3f}"),
        ("snr", "SNR (one step)", "{:.4f}"), ("cosine_limit", "cos(E g, ref)", "{:.3f}"),
        ("cosine_one_unit", "cos(one step, ref)", "{:.3f}"), ("samples", "samples to cos c", "{:.0f}"))


def table(res: LabResult) -> dict[str, dict[str, tuple[float, float]]]:
    """estimator -> figure -> (value, se); 'samples' = units_to_cosine x samples per unit."""
    out = {}
    for e, name in enumerate(res.estimators):
        row = {k: (float(res.stats.value[k][e]), float(res.stats.se[k][e])) for k in core.gradstats.FIGURES}
        v, se = row["units_to_cosine"]
        row["samples"] = (v * res.samples_per_unit, se * res.samples_per_unit)
        out[name] = row
    return out


def recommend(res: LabResult) -> str:
    """One line: the estimator that needs the fewest samples to reach the target cosine, and why."""
    t = table(res)
    c = res.settings["cosine"]
    ranked = sorted(t, key=lambda k: t[k]["samples"][0])
    best, nxt = ranked[0], ranked[1] if len(ranked) > 1 else None
    (v, se), b = t[best]["samples"], t[best]["bias_factor"]
    if not math.isfinite(v):
        return f"no estimator reaches cosine {c} to the reference at this model: too little signal (more groups?)"
    line = (f"{best}: it reaches cosine {c} to the reference gradient with the fewest samples, "
            f"{v:.0f} ± {se:.0f} (REINFORCE without baseline: {t['reinforce']['samples'][0]:.0f}); "
            f"bias factor along the reference {b[0]:.2f} ± {b[1]:.2f}")
    if nxt is not None:
        v2, se2 = t[nxt]["samples"]
        if v2 - v < 2 * math.hypot(se, se2 if math.isfinite(se2) else 0):
            line += f"; not distinguishable from {nxt} ({v2:.0f} ± {se2:.0f}) with these samples"
    return line


def render_markdown(res: LabResult) -> str:
    t, st = table(res), res.settings
    head = "| estimator | " + " | ".join(label for _, label, _ in ROWS) + " |"
    lines = [f"# seqpg lab: {st['model']}" + (f" (checkpoint {st['checkpoint']}, step {st['step']})"
                                                if st["checkpoint"] else ""), "",
             f"{st['units']} units of {st['prompts_per_unit']} prompts x {st['samples_per_prompt']} samples "
             f"(one training step each) compared on the same samples; reference: {res.reference}'s mean over "
             f"{st['reference_units']} held-apart units (its expected cosine to the true gradient "
             f"~{res.reference_cosine:.2f}). Mean reward {res.mean_reward:+.3f} (std {res.reward_std:.3f}). "
             f"Cosine target c = {st['cosine']}. {res.seconds:.0f} s.", "",
             f"Gradient sketch: per-token score gradients of the output layer (LM head) projected on "
             f"{st['directions']} random rank-one directions; figures ± jackknife standard errors over units.", "",
             head, "|" + "---|" * (len(ROWS) + 1)]
    for name, row in t.items():
        cells = [(fmt.format(row[k][0]) + " ± " + fmt.format(row[k][1])) if math.isfinite(row[k][0]) else "never"
                 for k, _, fmt in ROWS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if res.skipped:
        lines += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in res.skipped.items())]
    lines += ["", f"**Recommendation**: {recommend(res)}", ""]
    return "\n".join(lines)


def write_report(res: LabResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    t = table(res)
    finite = {e: {k: [x if math.isfinite(x) else None for x in v] for k, v in row.items()} for e, row in t.items()}
    data = {"estimators": finite, "skipped": res.skipped, "reference": res.reference,
            "reference_cosine": res.reference_cosine, "mean_reward": res.mean_reward, "reward_std": res.reward_std,
            "samples_per_unit": res.samples_per_unit, "seconds": res.seconds, "settings": res.settings,
            "recommendation": recommend(res),
            "sketch": "output layer (LM head) per-token score gradients on random rank-one directions"}
    (out / "lab.json").write_text(json.dumps(data, indent=2))
    (out / "lab.md").write_text(render_markdown(res))
    from ..rundir.plots import plot_lab
    return [out / "lab.json", out / "lab.md", *plot_lab(t, out / "plots")]
