"""The public core API: flat names on ``seqpg``, exact signatures (a promise to later work), light import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import seqpg

SIGNATURES = {
    "token_logprobs": "(logits_BTV, tokens_BT, temperature=1.0, *, chunk_size=32)",
    "entropy_from_logits": "(logits_BTV, temperature=1.0, *, chunk_size=32)",
    "utility": "(logprobs_BT, advantages_BT, mask_BT)",
    "token_contributions": "(logprobs_BT, advantages_BT, mask_BT)",
    "compute_advantages": "(name, rewards, mask, *, group_ids=None, values=None, all_reduce=None, **params)",
    "whiten": "(x_BT, mask_BT, *, shift_mean=True, eps=1e-08, all_reduce=None)",
    "masked_sum": "(x, mask, *, dim=None, all_reduce=None)",
    "masked_mean": "(x, mask, *, dim=None, all_reduce=None)",
    "masked_var": "(x, mask, *, unbiased=True, all_reduce=None)",
    "policy_loss": "(name, logprobs, advantages, mask, *, old_logprobs=None, agg='token-mean', num_tokens=None, "
                   "num_seqs=None, max_len=None, sampler_weights=None, **params)",
    "sampler_correction": "(name, train_logprobs, sampler_logprobs, mask, *, cap=2.0)",
    "mismatch_stats": "(train_logprobs, sampler_logprobs, mask, truncated=None)",
    "aggregate_loss": "(loss_BT, mask_BT, mode, *, num_tokens=None, num_seqs=None, max_len=None)",
    "kl_estimate": "(name, logprobs_BT, ref_logprobs_BT, *, tol=0.0)",
    "kl_advantages": "(kl_BT, coef, mask, gamma=1.0)",
    "kl_penalty": "(rewards, kl_BT, coef, mask)",
    "kl_loss": "(logprobs, ref_logprobs, mask, *, estimator='k3', agg='token-mean', num_tokens=None, "
               "num_seqs=None, max_len=None, tol=0.0)",
    "value_loss": "(values_BT, returns_BT, mask_BT, *, old_values=None, clip_range=None, agg='token-mean', "
                  "num_tokens=None, num_seqs=None, max_len=None)",
    "combine_rewards": "(scores, weights, *, mask=None)",
}


def _bare(fn):
    sig = inspect.signature(fn)
    return str(sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in
                                       sig.parameters.values()], return_annotation=inspect.Signature.empty))


def test_public_signatures():
    for name, expected in SIGNATURES.items():
        assert _bare(getattr(seqpg, name)) == expected, name
    for name in ("ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "KL_ESTIMATORS", "FixedKLController",
                 "AdaptiveKLController", "PolicyLossStats", "ValueLossStats", "RewardStats", "TokenContributions",
                 "register_advantage", "register_policy_loss", "register_kl"):
        assert hasattr(seqpg, name), name
    assert set(seqpg.__all__) >= set(SIGNATURES)


def test_import_is_light():
    code = "import sys, seqpg; seqpg.token_logprobs; assert 'transformers' not in sys.modules, 'transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)
