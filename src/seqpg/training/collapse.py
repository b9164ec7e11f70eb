"""Collapse watch: per-step signs that a policy has degenerated, and one warning when they persist.

Two ways a fast policy-gradient run degenerates, both invisible in the mean reward:

* **no signal**: every group's task rewards are equal (a sparse verifier that no sample passes yet, all
  completions empty or alike), so a group baseline gives the task nothing to learn:
  ``collapse/flat_groups`` = 1. What the step then trains on is said apart, from the advantages it
  actually used (``adv_task_abs_max``, ``adv_abs_max``, ``kl_loss``): nothing at all; only the KL
  penalty's share of the advantages; only the KL loss term; or a critic's value errors. None of these
  is helped by a KL penalty, so the remedies named are the ones that create signal (demonstrations,
  partial credit, easier prompts, more samples, dynamic sampling);
* **one answer**: the samples of a prompt, or the completions across prompts, are (nearly) the
  same text, e.g. "I'm so glad you love my amazing amazing amazing ..." for every prompt:
  ``collapse/distinct_in_group`` -> 1/n and ``collapse/distinct_2`` -> 0; or every prompt gets the same
  answer that is not repetitive in itself, e.g. "I'm a wonderful and kind person ..." whatever the topic
  (measured at seqpg's defaults without KL): sampled at temperature 1 these still differ after their first
  words, so distinct-2 stays high (0.6), but a third or more of them open alike, across prompts:
  ``collapse/shared_opening``.

Metrics (pure functions of one step's rewards, group ids and completion texts):

=========================  ===================================================================
``collapse/flat_groups``   fraction of prompt groups whose rewards are all equal (max - min <= tol)
``collapse/distinct_in_group``  mean over groups of (distinct completions) / (group size)
``collapse/distinct_2``    distinct word bigrams / all word bigrams over the step's completions
                           ("distinct-2", Li et al. 2016); character bigrams where no completion
                           has two words; 0 when there is none (empty answers)
``collapse/shared_opening``  fraction of the step's completions that open with its most common first
                           ``OPENING_WORDS`` words, when completions of two or more prompts open so;
                           completions under ``MIN_OPENING_TEXT`` words are not counted (a short
                           answer format, "The answer is 14", is not a collapse); 0 with one prompt
=========================  ===================================================================

A step is *collapsed* when ``flat_groups`` is 1, ``distinct_2`` is below ``min_distinct``, or
``shared_opening`` is at least ``max_shared_opening``;
:class:`CollapseWatch` warns once after ``steps`` consecutive collapsed steps, naming the usual
remedies. (Healthy sampling at temperature 1 keeps distinct-2 well above 0.5 over 16 sentences;
a repeated word drives it to a few hundredths.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

OPENING_WORDS = 3
"""Words of a completion's opening compared across prompts."""
MIN_OPENING_TEXT = 8
"""Completions shorter than this many words are left out of ``shared_opening``."""

FLAT_REMEDIES = ("a supervised start on a few demonstrations (seqpg sft, then seqpg train --init), partial credit "
                 "in the reward, easier prompts, more samples per prompt (sampling.samples_per_prompt), or dynamic "
                 "sampling (sampling.dynamic_sampling=true), which keeps drawing prompts until groups with signal "
                 "fill the batch")
"""Remedies for flat groups: ways to get a sample that is better than its group. Not a KL penalty, which adds
no task signal."""

REMEDIES = ("a KL penalty to the reference model (algo.kl_coef: 0.05 by default, larger holds the policy closer; "
            "0 turns it off), a lower learning rate (optim.lr), or a reward that does not pay for emptiness or "
            "repetition")


def flat_groups(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """(G,) bool: whether each group's rewards span at most ``tol``, groups in the order of their sorted ids.
    (B,), (B,) -> (G,)."""
    if rewards_B.shape != group_ids_B.shape or rewards_B.dim() != 1:
        raise ValueError(f"rewards_B and group_ids_B must both be (B,), got {tuple(rewards_B.shape)} and "
                         f"{tuple(group_ids_B.shape)}")
    _, inv_B = torch.unique(group_ids_B, return_inverse=True)
    G = int(inv_B.max()) + 1
    r = rewards_B.double()
    hi = torch.full((G,), -torch.inf, dtype=r.dtype).scatter_reduce(0, inv_B, r, "amax")
    lo = torch.full((G,), torch.inf, dtype=r.dtype).scatter_reduce(0, inv_B, r, "amin")
    return (hi - lo) <= tol


def flat_group_fraction(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, tol: float = 1e-6) -> float:
    """Fraction of groups whose rewards span at most ``tol`` (no signal for a group baseline). (B,), (B,)."""
    return float(flat_groups(rewards_B, group_ids_B, tol).double().mean())


def distinct_in_group(completions: Sequence[str], group_ids_B: torch.Tensor) -> float:
    """Mean over groups of (number of distinct completions, whitespace-normalised) / (group size)."""
    groups: dict[int, list[str]] = {}
    for text, g in zip(completions, group_ids_B.tolist(), strict=True):
        groups.setdefault(g, []).append(" ".join(text.split()))
    return sum(len(set(v)) / len(v) for v in groups.values()) / len(groups)


def distinct_n(completions: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over the completions (Li et al. 2016).

    Completions too short for a word n-gram (single words, digits, code without spaces) are measured by
    character n-grams instead, so that a one-word answer is not mistaken for an empty one; 0 when there
    is no n-gram of either kind (empty answers)."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in completions) for i in range(len(w) - n + 1)]
    if not grams:
        grams = [t[i:i + n] for t in ("".join(c.lower().split()) for c in completions) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def shared_opening(completions: Sequence[str], group_ids_B: torch.Tensor, words: int = OPENING_WORDS,
                   min_words: int = MIN_OPENING_TEXT) -> tuple[float, str]:
    """(share, opening): the fraction of all completions that open with the most common first ``words``
    words (lower-cased), and that opening, when completions of at least two groups (prompts) open with it;
    (0.0, "") otherwise. Completions of fewer than ``min_words`` words are not counted as opening alike."""
    openings: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for text, g in zip(completions, group_ids_B.tolist(), strict=True):
        w = text.lower().split()
        if len(w) >= min_words:
            key = " ".join(w[:words])
            openings.setdefault(key, set()).add(g)
            counts[key] = counts.get(key, 0) + 1
    across = [k for k, gs in openings.items() if len(gs) >= 2]
    if not across or not completions:
        return 0.0, ""
    top = max(across, key=lambda k: counts[k])
    return counts[top] / len(completions), top


def collapse_metrics(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, completions: Sequence[str], *,
                     openings: bool = True) -> dict[str, float]:
    """The module's metrics for one step; ``openings`` False leaves out ``shared_opening`` (multi-turn episodes,
    whose first move, e.g. asking the user a question, may rightly be the same whatever the prompt)."""
    m = {"collapse/flat_groups": flat_group_fraction(rewards_B, group_ids_B),
         "collapse/distinct_in_group": distinct_in_group(completions, group_ids_B),
         "collapse/distinct_2": distinct_n(completions, 2)}
    if openings:
        m["collapse/shared_opening"] = shared_opening(completions, group_ids_B)[0]
    return m


@dataclass
class CollapseWatch:
    """Counts consecutive collapsed steps; :meth:`update` returns the warning once, then None."""

    steps: int = 5
    """Consecutive collapsed steps before the warning; 0 disables the watch."""
    min_distinct: float = 0.2
    """A step whose distinct-2 is below this is collapsed."""
    max_shared_opening: float = 0.3
    """A step in which at least this fraction of completions, of two or more prompts, open alike is collapsed."""
    run: int = 0
    warned: bool = False

    def collapsed(self, m: dict[str, float]) -> str | None:
        """Why the step looks collapsed, or None."""
        if m["collapse/flat_groups"] >= 1.0:
            return flat_reason(m)
        if m["collapse/distinct_2"] < self.min_distinct:
            return (f"completions are near-identical (distinct-2 {m['collapse/distinct_2']:.2f} < "
                    f"{self.min_distinct}; {m['collapse/distinct_in_group']:.2f} distinct per group)")
        if m.get("collapse/shared_opening", 0.0) >= self.max_shared_opening:
            return (f"completions of different prompts open alike ({m['collapse/shared_opening']:.0%} of them with "
                    f"the same first {OPENING_WORDS} words): one answer whatever the prompt")
        return None

    def update(self, step: int, m: dict[str, float]) -> str | None:
        if self.steps <= 0 or self.warned:
            return None
        why = self.collapsed(m)
        self.run = self.run + 1 if why else 0
        if self.run < self.steps:
            return None
        self.warned = True
        if m["collapse/flat_groups"] >= 1.0:
            return f"no learning signal at step {step}: for {self.run} steps {why}. Usual remedies: {FLAT_REMEDIES}."
        return (f"the policy looks collapsed at step {step}: for {self.run} steps {why}. Usual remedies: "
                f"{REMEDIES}.")


def flat_reason(m: dict[str, float]) -> str:
    """What a step whose groups all have equal task rewards trained on, read from its advantages' metrics:
    ``adv_task_abs_max`` (the estimator's part), ``adv_abs_max`` (what the loss saw) and ``kl_loss``."""
    flat = "every group's task rewards are equal"
    task, total = m.get("adv_task_abs_max", 0.0), m.get("adv_abs_max", 0.0)
    if task > 0:
        return (f"{flat}; the advantages (max |A| {total:.3g}) come from the critic's value errors and the KL "
                f"penalty, not from the task")
    if total > 0:
        return (f"{flat}; the advantages (max |A| {total:.3g}) come only from the KL penalty, which pulls the "
                f"policy back towards its reference and teaches nothing of the task")
    if m.get("kl_loss", 0.0) > 0:
        return f"{flat}, so every advantage is 0; only the KL loss term moves the policy, back towards its reference"
    return f"{flat} and every advantage is 0: no learning signal, the policy does not move"
