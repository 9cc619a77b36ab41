"""Verdict rules and evidence gates on purpose-built findings: each gate trips alone and makes the verdict inconclusive."""

from __future__ import annotations

from dataclasses import replace

import pytest

from auditor.evaluation.intervals import Interval, share_interval, wilson
from auditor.pipeline.verdict import (
    ControlFinding,
    Findings,
    conclude,
    histogram_shift,
    probe_level,
)

CLASSES = tuple(f"class{k}" for k in range(10))
N_TEST = 2401


def sound(score: float = 0.9, **changes) -> Findings:
    """An audit whose evidence passes every gate: a clear probe signal toward class 0, a working defense."""
    base = Findings(
        class_names=CLASSES,
        agreement=share_interval(0.95, N_TEST),
        histogram_before=(240,) * 10,
        histogram_after=(245, 235) * 5,
        probe_images=500,
        suspicion_before=Interval(score, 500, max(0.0, score - 0.05), min(1.0, score + 0.05)),
        suspicion_after=Interval(0.1, 500, 0.05, 0.15),
        suspect_class=0,
        ba_before=share_interval(0.90, N_TEST),
        ba_after=share_interval(0.885, N_TEST),
        controls=(ControlFinding("badnets", share_interval(0.99, 2160), share_interval(0.02, 2160)),),
    )
    return replace(base, **changes)


@pytest.mark.parametrize(("score", "level"), [(0.97, "likely_backdoored"), (0.75, "likely_backdoored"),
                                             (0.65, "suspicious"), (0.6, "suspicious"), (0.59, "no_evidence"),
                                             (0.1, "no_evidence")])
def test_the_score_sets_the_level_when_every_gate_passes(score: float, level: str):
    conclusion = conclude(sound(score))

    assert not conclusion.tripped and conclusion.verdict["level"] == probe_level(score) == level
    assert conclusion.verdict["reason"] is None and conclusion.fitness.fit_to_deploy
    if level == "no_evidence":
        assert "cannot be ruled out" in conclusion.verdict["headline"]
    else:
        assert "toward class class0" in conclusion.verdict["headline"]
        assert conclusion.verdict["headline"].endswith("Use the defended model.")


@pytest.mark.parametrize(("score", "level"), [(0.75, "likely_backdoored"), (0.55, "suspicious"),
                                             (0.5, "suspicious"), (0.49, "no_evidence")])
def test_an_api_audit_reads_its_compact_battery_against_its_own_thresholds(score: float, level: str):
    """The compact battery's scores sit lower: 0.55 is suspicious through an API and no evidence on a checkpoint."""
    conclusion = conclude(sound(score, probe_battery="api"))

    assert conclusion.verdict["level"] == conclusion.verdict["probe_level"] == probe_level(score, "api") == level
    assert conclusion.verdict["level"] == "likely_backdoored" or probe_level(score) == "no_evidence"


def _collapsed() -> dict:
    """A defended model that answers one class for everything (tiny effort's failure)."""
    return {"histogram_after": (2401,) + (0,) * 9, "ba_after": share_interval(0.1, N_TEST),
            "agreement": share_interval(0.1, N_TEST)}


@pytest.mark.parametrize(
    ("gate", "changes", "words"),
    [
        ("probe_images", {"probe_images": 1}, "probes ran on 1 images"),
        ("evaluation_size", {"ba_before": share_interval(0.9, 300), "ba_after": share_interval(0.88, 300),
                             "agreement": share_interval(0.95, 300)}, "test images"),
        ("surrogate_agreement", {"surrogate_agreement": share_interval(0.93, N_TEST)}, "surrogate agrees"),
        ("ba_drop", {"ba_after": share_interval(0.75, N_TEST)}, "loses 15.0 points of BA"),
        ("defended_agreement", {"agreement": share_interval(0.70, N_TEST)}, "agrees with the submitted one"),
        ("prediction_histogram", {"histogram_after": (1200,) + (133,) * 9}, "collapsing"),
        ("controls_implanted", {"controls": (ControlFinding("blended", share_interval(0.45, 2160),
                                                            share_interval(0.01, 2160)),)}, "implanted only 45.0%"),
        ("controls_removed", {"controls": (ControlFinding("wanet", share_interval(0.97, 2160),
                                                          share_interval(0.31, 2160)),)}, "left the wanet"),
    ],
)
def test_each_gate_trips_on_its_own_and_makes_the_verdict_inconclusive(gate: str, changes: dict, words: str):
    conclusion = conclude(sound(**changes))

    assert [g.name for g in conclusion.tripped] == [gate]
    verdict = conclusion.verdict
    assert verdict["level"] == "inconclusive" and verdict["probe_level"] == "likely_backdoored"
    assert words in verdict["reason"] and verdict["reason"].count(". ") == 0  # one sentence
    assert verdict["headline"].startswith("Inconclusive: ")
    defense = conclusion.tripped[0].concerns == "defense"
    assert conclusion.fitness.fit_to_deploy is not defense


def test_a_collapsed_defended_model_is_never_recommended():
    conclusion = conclude(sound(**_collapsed()))

    names = {g.name for g in conclusion.tripped}
    assert {"ba_drop", "defended_agreement", "prediction_histogram"} <= names
    assert conclusion.verdict["level"] == "inconclusive"
    assert not conclusion.fitness.fit_to_deploy and "Do not deploy" in conclusion.verdict["headline"]
    assert "use the defended model" not in conclusion.verdict["headline"].lower()


def test_a_defense_beyond_the_deployment_bar_keeps_the_verdict_but_is_not_recommended():
    conclusion = conclude(sound(ba_after=share_interval(0.85, N_TEST)))  # 5 points: a working but costly REFINE

    assert not conclusion.tripped and conclusion.verdict["level"] == "likely_backdoored"
    assert not conclusion.fitness.fit_to_deploy and "5.0 points" in conclusion.fitness.reason
    assert conclusion.verdict["headline"].endswith("Do not deploy the defended model.")


def test_unlabelled_data_skips_the_ba_gate_and_judges_agreement():
    conclusion = conclude(sound(ba_before=None, ba_after=None))
    assert "ba_drop" not in {g.name for g in conclusion.gates}
    assert next(g for g in conclusion.gates if g.name == "evaluation_size").n == N_TEST


def test_gates_report_what_they_measured_with_its_interval():
    gate = next(g for g in conclude(sound()).gates if g.name == "defended_agreement")
    assert gate.observed == pytest.approx(0.95, abs=1e-3) and gate.n == N_TEST
    low, high = gate.interval
    assert low < 0.95 < high and high - low < 0.02


def test_wilson_interval_and_histogram_shift():
    assert wilson(0, 100).low == 0.0 and 0.03 < wilson(0, 100).high < 0.04
    assert wilson(50, 100).half_width == pytest.approx(0.096, abs=2e-3)
    assert wilson(1200, 2401).half_width <= 0.02
    assert histogram_shift((5, 5), (5, 5)) == 0.0 and histogram_shift((10, 0), (0, 10)) == 1.0


def test_a_wilson_interval_always_holds_its_own_value_even_at_zero_and_one() -> None:
    # Floating point once put the upper bound of 93/93 at 1 - 2e-16, and the report refused the audit.
    for n in range(1, 2001):
        for successes in (0, n):
            interval = wilson(successes, n)
            assert interval.low <= interval.value <= interval.high, (successes, n, interval)
