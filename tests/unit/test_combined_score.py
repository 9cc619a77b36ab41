"""The combined detection score: a probability from probes + trigger search, its thresholds, and how the verdict uses it.

The coefficients are whatever bench/detection_fmnist.py fitted; these tests hold the rules
around them (ordering, the recovered-trigger floor, API audits left to the probes), not the
fitted numbers.
"""

from __future__ import annotations

import math

import pytest
from test_detection import trigger
from test_verdict import sound

from auditor.detection.combined import COMBINED, FEATURES, CombinedModel, features
from auditor.pipeline.verdict import conclude, probe_level
from auditor.report.schema import ReportValidationError, validate_report

TOY = CombinedModel(intercept=-3.0, weights={"probe_score": 4.0, "anomaly_index": 1.0, "log_norm_ratio": -1.0,
                                             "success": 0.0}, likely=0.9, suspicious=0.5, fitted_by="test")


def test_the_score_is_the_logistic_of_the_weighted_features():
    values = features({"probe_score": 0.5, "anomaly_index": 2.0, "norm_ratio": math.exp(-1.0), "success": 0.7})

    assert values == pytest.approx([0.5, 2.0, -1.0, 0.7])
    assert TOY.score(values) == pytest.approx(1 / (1 + math.exp(-(-3.0 + 2.0 + 2.0 + 1.0))))
    # A search that did not report a value counts as finding nothing; an empty mask stays finite.
    assert features({"probe_score": 0.2}) == [0.2, 0.0, 0.0, 0.0]
    assert math.isfinite(features({"norm_ratio": 0.0})[2])


def test_levels_follow_the_thresholds_and_a_recovered_trigger_only_lifts_no_evidence_to_suspicious():
    assert TOY.level(0.9) == "likely_backdoored" and TOY.level(0.89) == "suspicious"
    assert TOY.level(0.5) == "suspicious" and TOY.level(0.49) == "no_evidence"
    assert TOY.level(0.1, trigger_recovered=True) == "suspicious"
    assert TOY.level(0.95, trigger_recovered=True) == "likely_backdoored"


def test_the_shipped_model_is_fitted_ordered_and_uses_every_feature():
    assert set(COMBINED.weights) == set(FEATURES)
    assert 0.0 < COMBINED.suspicious <= COMBINED.likely < 1.0
    assert COMBINED.fitted_by and COMBINED.fitted_by != "placeholder"


@pytest.mark.parametrize("probe", [0.05, 0.5, 0.95])
def test_checkpoint_verdicts_take_their_level_from_the_combined_score(probe: float):
    found = trigger(success=0.5, index=1.0, ratio=0.8, area=0.2)  # nothing recovered
    verdict = conclude(sound(probe, trigger=found)).verdict
    combined = verdict["combined"]
    expected = COMBINED.score(features({"probe_score": probe, "anomaly_index": 1.0, "norm_ratio": 0.8,
                                        "success": found.success.value}))

    assert combined["score"] == pytest.approx(expected, abs=1e-4)
    assert verdict["level"] == combined["level"] == COMBINED.level(expected)
    assert verdict["probe_level"] == probe_level(probe)
    assert "probability" in combined["meaning"].lower()


def test_a_recovered_trigger_never_leaves_no_evidence_whatever_the_score():
    verdict = conclude(sound(0.0, trigger=trigger())).verdict
    assert verdict["trigger_evidence"] is True and verdict["level"] != "no_evidence"


def test_api_audits_keep_the_probe_level_and_have_no_combined_score():
    verdict = conclude(sound(0.2, trigger=trigger(on_surrogate=True))).verdict
    assert verdict["combined"] is None and verdict["level"] == probe_level(0.2)
    assert conclude(sound(0.8)).verdict["combined"] is None


def test_the_report_carries_the_combined_score_and_refuses_inverted_thresholds():
    from report_sample import sample_report

    report = sample_report()
    combined = conclude(sound(0.9, trigger=trigger())).verdict["combined"]
    report["verdict"]["combined"] = combined
    assert validate_report(report).verdict.combined.score == combined["score"]
    inverted = {**combined, "suspicious_threshold": 0.99, "likely_threshold": 0.5}
    with pytest.raises(ReportValidationError, match="suspicious threshold"):
        validate_report({**report, "verdict": {**report["verdict"], "combined": inverted}})
