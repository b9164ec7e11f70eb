"""The pure mathematical core of seqpg: tensors in, tensors out (no model, no config, no I/O).

Modules, one concern each:

* :mod:`.logprobs`   token log-probabilities and entropies from logits, chunked (forward and backward)
* :mod:`.utility`    U = sum_t log pi * A, and each token's share of it
* :mod:`.rewards`    weighted sums of scorers, crediting sequence rewards to the last token
* :mod:`.advantages` advantage estimators by name (``ADVANTAGE_ESTIMATORS``)
* :mod:`.losses`     policy losses by name (``POLICY_LOSSES``) and the value loss
* :mod:`.aggregate`  the one loss-aggregation function (verl's four modes)
* :mod:`.kl`         KL estimators by name (``KL_ESTIMATORS``), penalty, loss, controllers
* :mod:`.gradstats`  paired gradient statistics of estimators (SNR, variance, bias, cosine), for the lab
* :mod:`.gradnoise`  the gradient noise scale (McCandlish et al. 2018) from mean-gradient norms
* :mod:`.mismatch`   importance weights for a sampler that is not the trainer (``SAMPLER_CORRECTIONS``)
* :mod:`.masked`     masked sum / mean / var and whitening, with cross-process statistics
* :mod:`.registry`   the name -> function registry every family uses

Shapes: B sequences, T tokens, V vocabulary; names carry them (``adv_BT``).
"""

from .advantages import (ADVANTAGE_ESTIMATORS, advantage_params, compute_advantages, register_advantage,
                         returns_to_go)
from .aggregate import AGG_MODES, aggregate_loss
from .gradnoise import GradientNoise, gradient_noise_scale
from .gradstats import GradStats, Moments, exact_stats, sample_stats, unit_gradients
from .kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_advantages, kl_estimate, kl_loss,
                 kl_penalty, register_kl)
from .logprobs import entropy_from_logits, token_logprobs
from .losses import (POLICY_LOSSES, PolicyLossStats, TokenLoss, ValueLossStats, policy_loss, register_policy_loss,
                     value_loss)
from .masked import masked_mean, masked_sum, masked_var, whiten
from .mismatch import (SAMPLER_CORRECTIONS, Correction, MismatchStats, mismatch_stats, register_sampler_correction,
                       sampler_correction)
from .registry import REQUIRED, Registry
from .rewards import RewardStats, ScorerStats, combine_rewards, to_token_rewards
from .utility import TokenContributions, token_contributions, utility

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "KL_ESTIMATORS", "POLICY_LOSSES", "REQUIRED", "SAMPLER_CORRECTIONS",
    "AdaptiveKLController", "Correction", "FixedKLController", "GradStats", "GradientNoise", "MismatchStats", "Moments",
    "PolicyLossStats", "Registry", "RewardStats", "ScorerStats", "TokenContributions", "TokenLoss", "ValueLossStats",
    "advantage_params", "aggregate_loss", "combine_rewards", "compute_advantages", "entropy_from_logits",
    "exact_stats", "gradient_noise_scale",
    "kl_advantages", "kl_estimate", "kl_loss", "kl_penalty", "masked_mean", "masked_sum", "masked_var",
    "mismatch_stats", "policy_loss", "register_advantage", "register_kl", "register_policy_loss",
    "register_sampler_correction", "returns_to_go", "sample_stats", "sampler_correction",
    "to_token_rewards", "token_contributions", "token_logprobs", "unit_gradients", "utility", "value_loss",
    "whiten",
]
