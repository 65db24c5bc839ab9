"""The promotion gate's decisions, without a server: tolerance edges and comparability."""

from __future__ import annotations

import math

import pytest

from saft.tracking.promotion import (
    PROMOTED,
    REJECTED,
    GateRule,
    Scores,
    comparability,
    decide,
)

ZS = Scores(id=0.60, ood_mean=0.50)
RULE = GateRule(ood_tolerance=0.01, id_tolerance=0.02)


def test_no_champion_compares_with_zero_shot_only():
    d = decide(Scores(0.70, 0.52), ZS, None, RULE)
    assert d.verdict == PROMOTED and d.promoted
    assert [c.name for c in d.checks] == ["OOD mean vs zero-shot", "ID vs zero-shot"]
    assert "no champion yet" in d.reason


@pytest.mark.parametrize("ood_drop, promoted", [(0.0, True), (0.01, True), (0.0101, False), (0.05, False)])
def test_ood_drop_against_zero_shot_edges(ood_drop, promoted):
    d = decide(Scores(0.70, ZS.ood_mean - ood_drop), ZS, None, RULE)
    assert d.promoted is promoted
    if not promoted:
        assert "OOD mean vs zero-shot" in d.reason and "exceeds tolerance 1.00" in d.reason


@pytest.mark.parametrize("id_drop, promoted", [(0.02, True), (0.0201, False)])
def test_id_drop_against_zero_shot_edges(id_drop, promoted):
    assert decide(Scores(ZS.id - id_drop, 0.55), ZS, None, RULE).promoted is promoted


@pytest.mark.parametrize("cand, promoted, failing", [
    (Scores(0.80, 0.60), True, None),                   # better on both
    (Scores(0.78, 0.59), True, None),                   # drops exactly at both tolerances
    (Scores(0.90, 0.5899), False, "OOD mean vs champion"),  # ID gain cannot buy an OOD regression
    (Scores(0.7799, 0.65), False, "ID vs champion"),    # OOD gain cannot buy an ID regression
])
def test_against_the_champion(cand, promoted, failing):
    champion = Scores(0.80, 0.60)
    d = decide(cand, ZS, champion, RULE, champion_label="champion v3")
    assert d.promoted is promoted
    assert len(d.checks) == 4
    if failing:
        assert d.verdict == REJECTED
        assert failing.replace("champion", "champion v3") in d.reason
        assert [c.name for c in d.checks if not c.passed] == [failing.replace("champion", "champion v3")]


def test_beating_the_champion_is_not_enough_below_zero_shot():
    # a weak champion (below zero-shot OOD) must not let a candidate through that also is
    weak_champion = Scores(0.80, 0.40)
    d = decide(Scores(0.85, 0.45), ZS, weak_champion, RULE)
    assert d.verdict == REJECTED
    assert "OOD mean vs zero-shot: 45.00 vs 50.00" in d.reason


def test_nan_metrics_never_promote():
    assert not decide(Scores(math.nan, 0.6), ZS, None, RULE).promoted
    assert not decide(Scores(0.7, math.nan), ZS, None, RULE).promoted


def test_not_comparable_champion_is_a_rejection_with_the_reason():
    d = decide(Scores(0.9, 0.9), ZS, None, RULE, not_comparable="champion v2 was evaluated on suite 'x'")
    assert d.verdict == REJECTED
    assert d.reason.startswith("not comparable with the champion: champion v2 was evaluated on suite 'x'")


def test_comparability_reasons():
    cand = {"saft.suite": "synthshift", "saft.base_fingerprint": "a" * 64}
    champ = {"saft.id": "0.8", "saft.ood_mean": "0.6", **cand}
    assert comparability(cand, champ, "2") is None
    assert "suite 'imagenet-shifts'" in comparability(cand, {**champ, "saft.suite": "imagenet-shifts"}, "2")
    reason = comparability(cand, {**champ, "saft.base_fingerprint": "b" * 64}, "2")
    assert "another base model" in reason and "new model name" in reason
    assert "no saft.id/saft.ood_mean tags" in comparability(cand, {"saft.suite": "synthshift"}, "2")


@pytest.mark.parametrize("bad", [-0.01, 1.0, math.nan, math.inf, "0.1"])
def test_tolerances_are_fractions(bad):
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\)"):
        GateRule(ood_tolerance=bad)


HM_RULE = GateRule(metric="hm", hm_tolerance=0.01)


@pytest.mark.parametrize("hm, promoted", [(0.70, True), (0.69, True), (0.6899, False)])
def test_hm_rule_against_zero_shot_edges(hm, promoted):
    d = decide(Scores(hm=hm), Scores(hm=0.70), None, HM_RULE)
    assert d.promoted is promoted and [c.name for c in d.checks] == ["HM vs zero-shot"]
    assert "hm" in HM_RULE.text


def test_hm_rule_against_the_champion_and_a_missing_score():
    d = decide(Scores(hm=0.75), Scores(hm=0.70), Scores(hm=0.80), HM_RULE, champion_label="champion v2")
    assert not d.promoted and "HM vs champion v2" in d.reason
    assert not decide(Scores(id=0.9, ood_mean=0.9), Scores(hm=0.7), None, HM_RULE).promoted  # no HM: never promoted
    from saft.tracking.promotion import HM_TAG, ZS_HM_TAG, scores_from_tags, zeroshot_from_tags

    tags = {HM_TAG: "0.75", ZS_HM_TAG: "0.7"}
    assert scores_from_tags(tags, rule=HM_RULE).hm == 0.75 and zeroshot_from_tags(tags, HM_RULE).hm == 0.7
    assert scores_from_tags(tags) is None  # the ID/OOD rule finds no ID/OOD tags
    reason = comparability({HM_TAG: "0.75"}, {"saft.id": "0.7", "saft.ood_mean": "0.5"}, "3", HM_RULE)
    assert "no saft.hm tags" in reason


def test_gate_metric_follows_the_suite_roles():
    from saft.tracking.promotion import gate_metric

    assert gate_metric({"base", "new"}) == "hm"
    assert gate_metric({"id", "ood", "id_subset"}) == "id_ood"
    with pytest.raises(ValueError, match="needs ID and OOD entries .* or base and new"):
        gate_metric({"ood"}, where="suite 'x'")
    with pytest.raises(ValueError, match="no base and new entries"):
        gate_metric({"id", "ood"}, "hm")
    with pytest.raises(ValueError, match="gate metric"):
        GateRule(metric="accuracy")
