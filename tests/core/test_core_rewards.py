"""combine_rewards and to_token_rewards: weighted sums, crediting, statistics, refusal of NaN."""

from __future__ import annotations

import pytest
import torch

from seqpg import combine_rewards, to_token_rewards


def test_weighted_sum_of_sequence_scores():
    total, st = combine_rewards({"helpful": torch.tensor([1.0, 2.0]), "harm": torch.tensor([0.0, 5.0])},
                                {"helpful": 0.8, "harm": -0.2})
    torch.testing.assert_close(total, torch.tensor([0.8, 0.6]))
    h = st.scorers["harm"]
    assert (h.mean, h.std, h.min, h.max, h.weight) == (2.5, 2.5, 0.0, 5.0, -0.2)
    assert st.total.mean == pytest.approx(0.7)
    assert st.to_dict()["helpful/max"] == 2.0 and "total/std" in st.to_dict()


def test_mixed_dense_and_sequence_scores_need_the_mask():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    dense = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.0, 0.3]])
    seq = torch.tensor([1.0, -1.0])
    total, st = combine_rewards({"fmt": dense, "ok": seq}, {"fmt": 2.0, "ok": 1.0}, mask=mask)
    torch.testing.assert_close(total, torch.tensor([[0.2, 0.4 + 1.0, 0.0], [0.0, 0.0, 0.6 - 1.0]]))
    assert st.scorers["fmt"].mean == pytest.approx(0.3)  # per-sequence sums 0.3 and 0.3
    with pytest.raises(ValueError, match="need mask"):
        combine_rewards({"fmt": dense, "ok": seq}, {"fmt": 2.0, "ok": 1.0})
    total_dense, _ = combine_rewards({"fmt": dense}, {"fmt": 0.5})  # all dense: no mask needed
    torch.testing.assert_close(total_dense, 0.5 * dense)


def test_refuses_non_finite_scores_naming_scorer_and_row():
    with pytest.raises(ValueError, match=r"scores\['judge'\] holds a non-finite value \(nan\) at row 2"):
        combine_rewards({"ok": torch.zeros(3), "judge": torch.tensor([0.0, 1.0, float("nan")])},
                        {"ok": 1.0, "judge": 1.0})
    with pytest.raises(ValueError, match=r"scores\['d'\] holds a non-finite value \(inf\) at row 1"):
        combine_rewards({"d": torch.tensor([[0.0, 0.0], [0.0, float("inf")]])}, {"d": 1.0})
    with pytest.raises(ValueError, match=r"weights\['ok'\] must be a finite number"):
        combine_rewards({"ok": torch.zeros(3)}, {"ok": float("nan")})


def test_weights_must_match_scorers():
    with pytest.raises(ValueError, match=r"missing \['b'\], without a score \['c'\]"):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="has 3 rows, other scorers have 2"):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": 1.0, "b": 1.0})


def test_sequence_reward_goes_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    out = to_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 3.0]]))
    with pytest.raises(ValueError, match="no real token"):
        to_token_rewards(torch.ones(2), torch.tensor([[1, 0], [0, 0]]))
