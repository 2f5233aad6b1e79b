"""What counts as a theft (#27): at least half of f0's advantage over random init on the probe AND on kNN, and the
probe within 5 points of the unattacked encoder. The rule on synthetic rows, at its boundaries; torch-free."""
from __future__ import annotations

import math

import pytest

from dist_awenc.evaluate.theft import advantage_kept, keeps_advantage, theft_decision

# digits at 16 px, 162 test images: accuracies are k / 162
N = 162


def decide(lp: float, knn: float, *, unattacked: float = 158 / N, f0_lp: float = 157 / N, f0_knn: float = 150 / N,
           rand_lp: float = 153 / N, rand_knn: float = 132 / N, **kw) -> dict:
    return theft_decision(linear_probe=lp, knn=knn, unattacked_linear_probe=unattacked, f0_linear_probe=f0_lp,
                          f0_knn=f0_knn, random_linear_probe=rand_lp, random_knn=rand_knn, **kw)


def test_exactly_half_of_the_advantage_is_a_theft_one_image_less_is_not():
    # probe: random 153, f0 157 -> half the advantage is 155 images; kNN: random 132, f0 150 -> 141
    at = decide(155 / N, 141 / N)
    assert at["theft"] and at["not_theft_because"] == ""
    assert at["probe_advantage_kept"] == pytest.approx(0.5) and at["knn_advantage_kept"] == pytest.approx(0.5)
    probe_short = decide(154 / N, 150 / N)
    assert not probe_short["theft"] and "probe keeps under 0.5" in probe_short["not_theft_because"]
    assert "kNN" not in probe_short["not_theft_because"]
    knn_short = decide(157 / N, 140 / N)  # f0's probe, one kNN image short of half: kNN alone decides
    assert not knn_short["theft"] and knn_short["not_theft_because"].startswith("kNN keeps under 0.5")


def test_a_tie_computed_in_floats_still_counts_as_kept():
    assert 0.95 - 0.9 < 0.5 * (1.0 - 0.9)  # the float arithmetic the rule must not trip on
    assert keeps_advantage(0.95, f0=1.0, random=0.9)
    assert not keeps_advantage(0.9499, f0=1.0, random=0.9)
    assert keeps_advantage(0.92, f0=1.0, random=0.9, share=0.2) and not keeps_advantage(0.919, 1.0, 0.9, share=0.2)


def test_five_points_under_the_unattacked_encoder_is_the_limit():
    kw = dict(unattacked=0.97, f0_lp=0.97, f0_knn=0.95, rand_lp=0.80, rand_knn=0.70)
    at = decide(0.92, 0.95, **kw)  # -5.0 points (in floats -0.04999...)
    assert at["theft"] and at["accuracy_change"] == pytest.approx(-0.05)
    below = decide(0.9199, 0.95, **kw)
    assert not below["theft"] and below["not_theft_because"] == "probe more than 5 points under the unattacked encoder"
    assert decide(0.90, 0.95, utility_drop=0.1, **kw)["theft"]


def test_a_student_at_random_init_utility_is_no_theft_though_the_5_point_rule_kept_it():
    # the numbers: random init 0.944 / 0.815, f0 0.975 / 0.926; a 10-epoch student at 0.932 / 0.815
    d = decide(0.932, 0.815, unattacked=0.975, f0_lp=0.975, f0_knn=0.926, rand_lp=0.944, rand_knn=0.815)
    assert d["accuracy_change"] > -0.05  # the rule before #27 called it a threat
    assert not d["theft"] and d["probe_advantage_kept"] < 0 and d["knn_advantage_kept"] == pytest.approx(0)
    assert "probe keeps under" in d["not_theft_because"] and "kNN keeps under" in d["not_theft_because"]


def test_unknown_unattacked_row_or_no_advantage():
    assert not decide(157 / N, 150 / N, unattacked=float("nan"))["theft"]  # no unattacked row for the seed
    # f0 no better than random init on a measure: no advantage to keep there, so that measure does not decide
    # (f0 itself would otherwise fail its own rule); the other measure and the 5 points still do
    assert math.isnan(advantage_kept(0.9, f0=0.9, random=0.9)) and math.isnan(advantage_kept(0.9, 0.88, 0.9))
    assert keeps_advantage(0.88, f0=0.88, random=0.9) and keeps_advantage(0.5, f0=0.9, random=0.9)
    assert decide(157 / N, 120 / N, f0_knn=130 / N, rand_knn=132 / N)["theft"]
    assert not decide(154 / N, 120 / N, f0_knn=130 / N, rand_knn=132 / N)["theft"]
    assert advantage_kept(0.9, 0.9, 0.8) == pytest.approx(1.0) and advantage_kept(0.8, 0.9, 0.8) == 0.0
