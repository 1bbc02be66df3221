"""The comparison report's statistics: paired bootstrap, worst share, per-budget rows, pooling seeds."""

from __future__ import annotations

import math

import pytest

from simulations.personalization_report import (Compute, ReportError, Scores, compute_markdown, paired_bootstrap,
                                                relative_changes, summary_rows, worst_share)


def test_identical_arrays_give_exactly_zero():
    assert paired_bootstrap([10.0, 20.0, 35.0], [10.0, 20.0, 35.0]) == (0.0, 0.0, 0.0)


def test_a_constant_change_has_a_zero_width_interval_however_different_the_users():
    # pairing: the baselines span 1..80, the per-user change is +10% for everyone
    baseline = [1.0, 2.0, 4.0, 80.0]
    mean, low, high = paired_bootstrap([1.1 * b for b in baseline], baseline)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)


def test_two_users_interval_spans_both_changes():
    # changes 0 and +20%: a resample of two users has mean 0 (p=1/4), 0.1 (1/2) or 0.2 (1/4), so the
    # 2.5th and 97.5th percentiles of 2000 resample means are 0 and 0.2
    mean, low, high = paired_bootstrap([1.0, 1.2], [1.0, 1.0])
    assert (mean, low, high) == pytest.approx((0.1, 0.0, 0.2), abs=1e-12)


def test_more_users_narrow_the_interval_around_the_mean():
    _, low2, high2 = paired_bootstrap([1.0, 1.2], [1.0, 1.0])
    mean, low, high = paired_bootstrap([1.0, 1.2] * 50, [1.0] * 100)
    assert mean == pytest.approx(0.1)
    assert low < mean < high
    # standard error 0.1 / sqrt(100): the 95% interval is about 0.04 wide, against 0.2 with two users
    assert 0.02 < high - low < 0.06 < high2 - low2


def test_bootstrap_is_seeded_and_refuses_unpaired_input():
    a, b = [3.0, 5.0, 4.0, 9.0, 7.0], [4.0, 4.0, 4.0, 8.0, 8.0]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3) != paired_bootstrap(a, b, seed=4)
    with pytest.raises(ValueError, match=r"equally long.*\(2,\) and \(3,\)"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])


def test_worst_share_is_the_mean_of_the_worst_ceil_ten_percent():
    assert worst_share([float(v) for v in range(1, 21)]) == 19.5  # ceil(2.0) = 2: 20 and 19
    assert worst_share([float(v) for v in range(1, 12)]) == 10.5  # ceil(1.1) = 2: 11 and 10
    assert worst_share([3.0, 9.0, 1.0]) == 9.0  # ceil(0.3) = 1
    with pytest.raises(ValueError, match="no values"):
        worst_share([])


def _compute(steps: list[float], seconds: float) -> Compute:
    return Compute(steps, [0.0], [seconds] * len(steps), [1.0], block_tokens=64, round_seconds=[10.0], peak_rss_mb=500.0)


def _scores(rounds: dict[int, dict[str, float]], steps: list[float] = (6.0,)) -> Scores:
    users = rounds[max(rounds)]
    return Scores(rounds, {u: 100.0 for u in users}, {u: ("comedies" if "a" in u else "tragedies") for u in users},
                  _compute(list(steps), 2.0))


def test_summary_rows_per_budget_against_each_baseline():
    scores = {
        "local": _scores({1: {"s0/a": 20.0, "s0/b": 40.0}, 2: {"s0/a": 20.0, "s0/b": 40.0}}),
        "fedavg": _scores({1: {"s0/a": 10.0, "s0/b": 40.0}, 2: {"s0/a": 10.0, "s0/b": 20.0}}),
        "dual": _scores({1: {"s0/a": 10.0, "s0/b": 40.0}, 2: {"s0/a": 11.0, "s0/b": 18.0}}),
    }
    rows = {(r["method"], r["round"]): r for r in summary_rows(scores, [1, 2])}
    assert set(rows) == {(m, n) for m in scores for n in (1, 2)}
    dual = rows["dual", 2]
    assert (dual["users"], dual["mean"], dual["median"], dual["worst10"]) == (2, 14.5, 14.5, 18.0)
    # per user against fedavg: +10% and -10%; against local: -45% and -55%
    assert dual["vs_fedavg"] == pytest.approx(0.0) and dual["better_fedavg"] == 0.5
    assert dual["worst10_vs_fedavg"] == pytest.approx(0.1)
    assert dual["vs_fedavg_low"] == pytest.approx(-0.1) and dual["vs_fedavg_high"] == pytest.approx(0.1)
    assert dual["vs_local"] == pytest.approx(-0.5) and dual["better_local"] == 1.0
    assert rows["dual", 1]["vs_fedavg"] == 0.0 and rows["dual", 1]["better_fedavg"] == 0.0
    assert "vs_fedavg" not in rows["fedavg", 2] and "vs_local" in rows["fedavg", 2]
    assert "vs_local" not in rows["local", 1]


def test_an_unevaluated_budget_round_is_named():
    scores = {"fedavg": _scores({2: {"s0/a": 10.0}})}
    with pytest.raises(ReportError, match=r"round 1 was not evaluated \(evaluated: \[2\]\)"):
        summary_rows(scores, [1])


def test_pooling_keeps_each_seeds_users_apart_and_concatenates_compute():
    seed0 = _scores({1: {"seed0/x": 10.0}, 2: {"seed0/x": 8.0}}, steps=[6.0, 6.0])
    seed1 = _scores({1: {"seed1/x": 30.0}, 2: {"seed1/x": 20.0}}, steps=[12.0])
    pooled = Scores.pool([seed0, seed1])
    assert pooled.rounds == {1: {"seed0/x": 10.0, "seed1/x": 30.0}, 2: {"seed0/x": 8.0, "seed1/x": 20.0}}
    assert pooled.curve() == {1: 20.0, 2: 14.0}
    row = pooled.compute.row()
    assert row["train_steps"] == 8.0 and row["train_tokens"] == 8.0 * 64 and row["train_s"] == 2.0
    assert relative_changes({"u": 11.0, "v": 9.0}, {"u": 10.0, "v": 10.0, "w": 1.0}) == pytest.approx([0.1, -0.1])
    with pytest.raises(ReportError, match="no user in common"):
        relative_changes({"u": 1.0}, {"v": 1.0})
    assert math.isnan(Compute([], [], [], [], 64, [], float("nan")).row()["train_steps"])


def test_compute_table_marks_personal_steps_the_clients_did_not_report():
    unreported = _scores({1: {"s0/a": 10.0}})
    reported = _scores({1: {"s0/a": 10.0}})
    reported.compute = Compute([30.0], [0.0], [2.0], [1.0], 64, [10.0], 500.0, personal_reported=True)
    text = compute_markdown({"local": unreported, "fedavg": unreported, "dual": unreported, "ditto": reported})
    assert "| dual* | 6.0 | 384 |" in text and "| ditto | 30.0 | 1920 |" in text
    assert "| local | 6.0 |" in text and "| fedavg | 6.0 |" in text  # local's steps are its personal ones
    assert "did not report `personal-steps`" in text
    assert "did not report" not in compute_markdown({"fedavg": unreported})
