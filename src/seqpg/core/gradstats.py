"""Gradient statistics of advantage estimators, from paired samples: which estimator a task needs.

A *unit* is what one training step sees: a batch of P prompts x n samples (B = P n rows). Given
each row's per-token score-function gradient, or a sketch of it (D numbers per token; e.g. its
projections on D fixed random directions, which preserve inner products in expectation),

    s_{i,t} = d log pi(y_{i,t} | x_i, y_{i,<t}) / d theta   (sketched)                   (1)

an estimator e gives the unit's policy-gradient estimate (``seq-mean-token-sum`` aggregation, the
one whose expectation is grad E[R] for an unbiased A; any other aggregation reweights tokens)

    g^e = (1/B) sum_i sum_t A^e_{i,t} s_{i,t},   A^e from ``compute_advantages(e, ...)``   (2)

so every estimator is computed from the SAME samples (a paired comparison) and by the core's
own registered function, never re-implemented. Units are iid; from U of them (or from every
possible unit with its probability, on a problem small enough to enumerate) :class:`Moments`
holds mu = E g, V = E ||g - mu||^2 (trace of the covariance) and ||mu||^2 (unbiased for U units:
||g_bar||^2 - V/U). :func:`figures` turns moments and a reference direction r (grad E[R], or a
large-sample unbiased estimate of it) into

===================  ===========================================  ==================================
figure               definition                                    reading
===================  ===========================================  ==================================
bias_factor          mu . r / ||r||^2                              1: unbiased along r; (1 - 1/n):
                                                                   dr_grpo's mean baseline
variance_ratio       V_e / V_base (base: REINFORCE, no baseline)   < 1: less noise than REINFORCE
snr                  ||mu||^2 / V                                  one unit's signal-to-noise ratio
cosine_limit         mu . r / (||mu|| ||r||)                       cosine of the expected step to r
cosine_one_unit      mu . r^ / sqrt(||mu||^2 + V)                  ~E cos(g, r) of one unit's step
units_to_cosine      V / ((mu . r^)^2 / c^2 - ||mu||^2)            units m whose mean reaches
                                                                   cosine c (inf if never)
===================  ===========================================  ==================================

(the cosine of the mean of m units is taken as mu . r^ / sqrt(||mu||^2 + V / m), the ratio of
the expectations; r^ = r / ||r||). Standard errors are the delete-one-unit jackknife's (Efron
1982), vectorised over units; paired ratios (``variance_ratio``) get the correlation between
estimators on the same samples for free.

Departures: the reference r is taken as fixed: the standard errors leave out its own noise (the
caller reports it, e.g. as its expected cosine to the truth), though an unbiased ||grad E[R]||^2
(``ref_sq``) keeps that noise from biasing the figures; GAE, which needs critic values, is the
caller's to pass or to skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_mask, check_rank
from .advantages import compute_advantages

FIGURES = ("bias_factor", "variance_ratio", "snr", "cosine_limit", "cosine_one_unit", "units_to_cosine")
"""The names :func:`figures` returns, in table order."""


def unit_gradients(estimator: str, rewards: torch.Tensor, mask_BT: torch.Tensor, score_BTD: torch.Tensor,
                   unit_ids_B: torch.Tensor, *, group_ids_B: torch.Tensor | None = None,
                   **params) -> torch.Tensor:
    """(U, D) each unit's estimate g^e of eq. (2), units in ascending id order.

    rewards: (B,) or (B, T); mask_BT: (B, T); score_BTD: (B, T, D) the (sketched) score gradients of
    eq. (1); unit_ids_B: (B,) ints, rows of one unit share an id; group_ids_B: (B,) prompt ids.
    Advantages come from ``compute_advantages(estimator, ...)``: an estimator with batch statistics
    (one that calls ``all_reduce``, as the registry's contract asks of them) is called once per unit,
    so it sees exactly one step's batch; any other sees only a row's group (a group never spans
    processes, nor here units), so all units go in one call, groups renumbered per unit. ``params``
    go to ``compute_advantages``; a tensor with B rows (ReMax's ``baseline``, GAE's ``values``) is
    split with the rows.
    """
    mask_BT = check_mask("mask_BT", mask_BT)
    check_rank("score_BTD", score_BTD, 3, "(B, T, D)")
    check_rank("unit_ids_B", unit_ids_B, 1, "(B,)")
    B, T = mask_BT.shape
    if score_BTD.shape[:2] != (B, T) or unit_ids_B.shape[0] != B:
        raise ValueError(f"score_BTD must be (B, T, D) = ({B}, {T}, D) and unit_ids_B (B,) = ({B},); got "
                         f"{tuple(score_BTD.shape)} and {tuple(unit_ids_B.shape)}")
    ids_U, unit_B = torch.unique(unit_ids_B, return_inverse=True)
    U = ids_U.numel()

    def advantages(rows: torch.Tensor | None, groups_B: torch.Tensor | None, all_reduce=None) -> torch.Tensor:
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        p = {k: pick(v) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v
             for k, v in params.items()}
        adv_BT, _ = compute_advantages(estimator, pick(rewards), pick(mask_BT),
                                       group_ids=None if groups_B is None else pick(groups_B),
                                       all_reduce=all_reduce, **p)
        return adv_BT.to(score_BTD.dtype)

    def per_unit(adv_BT: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bt,btd->d", adv_BT, score_BTD[rows]) / rows.numel()

    first = (unit_B == 0).nonzero().squeeze(1)
    calls = []
    adv0_BT = advantages(first, group_ids_B, all_reduce=lambda t: calls.append(1) or t)
    if not calls:  # no batch statistic: rows see only their group, so all units go in one call
        groups_B = unit_B if group_ids_B is None else unit_B * (int(group_ids_B.max()) + 1) + group_ids_B
        adv_BT = advantages(None, groups_B.long())
        return torch.zeros(U, score_BTD.shape[2], dtype=score_BTD.dtype).index_add_(
            0, unit_B, torch.einsum("bt,btd->bd", adv_BT, score_BTD)) / torch.bincount(unit_B, minlength=U)[:, None]
    out = [per_unit(adv0_BT, first)]
    for u in range(1, U):
        rows = (unit_B == u).nonzero().squeeze(1)
        out.append(per_unit(advantages(rows, group_ids_B), rows))
    return torch.stack(out)


@dataclass
class Moments:
    """First and second moments of E estimators' unit estimates; leading dims (...,) batch jackknife copies."""

    mean_ED: torch.Tensor  # (..., E, D) mu
    var_E: torch.Tensor  # (..., E) V = E ||g - mu||^2
    musq_E: torch.Tensor  # (..., E) ||mu||^2, unbiased when estimated from samples
    units: float  # U; inf for exact moments

    @classmethod
    def exact(cls, g_EUD: torch.Tensor, prob_U: torch.Tensor) -> "Moments":
        """Moments of the distribution that puts probability ``prob_U`` on unit outcome u (enumeration)."""
        check_rank("g_EUD", g_EUD, 3, "(E, U, D)")
        w_U = prob_U.to(g_EUD.dtype) / prob_U.sum()
        mean_ED = torch.einsum("u,eud->ed", w_U, g_EUD)
        var_E = torch.einsum("u,eu->e", w_U, (g_EUD - mean_ED[:, None]).pow(2).sum(-1))
        return cls(mean_ED, var_E, mean_ED.pow(2).sum(-1), math.inf)

    @classmethod
    def from_sums(cls, sum_ED: torch.Tensor, sumsq_E: torch.Tensor, units: int) -> "Moments":
        """From sum_u g_u and sum_u ||g_u||^2 over ``units`` iid units (unbiased V and ||mu||^2)."""
        if units < 2:
            raise ValueError(f"need at least 2 units for a variance, got {units}")
        mean_ED = sum_ED / units
        sq_E = mean_ED.pow(2).sum(-1)
        var_E = (sumsq_E - units * sq_E) / (units - 1)
        return cls(mean_ED, var_E, sq_E - var_E / units, float(units))


def figures(m: Moments, ref_D: torch.Tensor, *, base: int = 0, cosine: float = 0.5,
            ref_sq: float | None = None) -> dict[str, torch.Tensor]:
    """The table of the module docstring, each (..., E), from moments and the reference direction.

    base: the index of REINFORCE without baseline among the E estimators (``variance_ratio``'s unit);
    cosine: the target c of ``units_to_cosine``; ref_sq: when ``ref_D`` is itself an estimate of
    grad E[R] (independent of the units), an unbiased estimate of ||grad E[R]||^2 to use for ||r||^2:
    then mu . r / ref_sq is unbiased in the numerator and denominator alike, where ||r||^2 would
    carry the reference's own variance and shrink every bias factor and cosine towards 0.
    """
    check_rank("ref_D", ref_D, 1, "(D,)")
    if not 0 < cosine < 1:
        raise ValueError(f"cosine must be in (0, 1), got {cosine}")
    if ref_sq is not None and not ref_sq > 0:
        raise ValueError(f"the reference's squared norm estimate is {ref_sq:.3g} <= 0: the reference has no "
                         "measurable signal; use more reference groups")
    rnorm = ref_D.norm() if ref_sq is None else torch.tensor(ref_sq, dtype=ref_D.dtype).sqrt()
    if rnorm == 0:
        raise ValueError("the reference gradient is 0: no direction to compare with")
    along_E = m.mean_ED @ (ref_D / rnorm)  # mu . r^
    musq_E = m.musq_E.clamp(min=0)
    var_E = m.var_E.clamp(min=0)
    need_E = along_E.pow(2) / cosine ** 2 - musq_E
    reach_E = (along_E > 0) & (need_E > 0)
    return {
        "bias_factor": along_E / rnorm,
        "variance_ratio": var_E / var_E[..., base:base + 1],
        "snr": musq_E / var_E,
        "cosine_limit": along_E / musq_E.sqrt(),
        "cosine_one_unit": along_E / (musq_E + var_E).sqrt(),
        "units_to_cosine": torch.where(reach_E, var_E / need_E.clamp(min=1e-300), math.inf),
    }


@dataclass
class GradStats:
    """Figures of E estimators with standard errors (0 for exact moments)."""

    value: dict[str, torch.Tensor]  # name -> (E,)
    se: dict[str, torch.Tensor]  # name -> (E,)


def exact_stats(g_EUD: torch.Tensor, prob_U: torch.Tensor, ref_D: torch.Tensor, *, base: int = 0,
                cosine: float = 0.5) -> GradStats:
    """The figures of the exact distribution over enumerated unit outcomes (no standard error)."""
    value = figures(Moments.exact(g_EUD, prob_U), ref_D, base=base, cosine=cosine)
    return GradStats(value, {k: torch.zeros_like(v) for k, v in value.items()})


def sample_stats(g_EUD: torch.Tensor, ref_D: torch.Tensor, *, base: int = 0, cosine: float = 0.5,
                 ref_sq: float | None = None) -> GradStats:
    """The figures from U sampled units (E estimators on the same units), with jackknife standard errors.

    se^2 = (U - 1)/U sum_u (f_(-u) - mean f_(-.))^2, f_(-u) the figure without unit u. A figure that is
    infinite in some leave-one-out copy (``units_to_cosine`` near unreachable) gets se = inf.
    ``ref_sq``: see :func:`figures`.
    """
    check_rank("g_EUD", g_EUD, 3, "(E, U, D)")
    U = g_EUD.shape[1]
    if U < 3:
        raise ValueError(f"need at least 3 units for jackknife standard errors, got {U}")
    g = g_EUD.double()
    sum_ED, sumsq_EU = g.sum(1), g.pow(2).sum(-1)
    kw = dict(base=base, cosine=cosine, ref_sq=ref_sq)
    full = figures(Moments.from_sums(sum_ED, sumsq_EU.sum(1), U), ref_D.double(), **kw)
    loo = Moments.from_sums(sum_ED[None] - g.transpose(0, 1), sumsq_EU.sum(1)[None] - sumsq_EU.T, U - 1)  # (U, E, ...)
    jack = figures(loo, ref_D.double(), **kw)
    se = {}
    for k, f_UE in jack.items():
        finite_E = torch.isfinite(f_UE).all(0)
        d_UE = torch.where(finite_E, f_UE, 0) - torch.where(finite_E, f_UE, 0).mean(0)
        se[k] = torch.where(finite_E, ((U - 1) / U * d_UE.pow(2).sum(0)).sqrt(), math.inf)
    return GradStats(full, se)
