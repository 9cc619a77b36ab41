"""Trigger reverse-engineering: the anomaly index, a planted patch recovered on a tiny model, a clean model left
unflagged, and the verdict rule (a trigger recovered on the submitted model never coexists with no_evidence)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from test_probes import SIZE, arch, data  # noqa: F401 (fixtures)
from test_verdict import sound

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.data import ImageSet
from auditor.detection import (
    TriggerSearchConfig,
    anomaly_indices,
    is_flagged,
    most_anomalous,
    norm_ratio,
    search_triggers,
    stamp,
)
from auditor.evaluation.intervals import wilson
from auditor.models import build_classifier
from auditor.pipeline.verdict import TriggerFinding, conclude
from auditor.training import TrainConfig, train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: threads only add overhead

CPU = torch.device("cpu")
TARGET = 1
#: badnets stamps its 3x3 patch one pixel in from the bottom-right corner (auditor/attacks/catalog.py).
PATCH = (slice(SIZE - 4, SIZE - 1), slice(SIZE - 4, SIZE - 1))
SEARCH = TriggerSearchConfig(steps=200, images=128, batch_size=32, holdout_images=120)


# -- the anomaly index -------------------------------------------------------------------------------------------


def test_the_index_counts_robust_standard_deviations_below_the_median():
    norms = [20.0, 22.0, 18.0, 21.0, 19.0, 4.0]  # median 19.5, MAD 1.5
    indices = anomaly_indices(norms, log_scale=False)

    assert indices[5] == pytest.approx((19.5 - 4.0) / (1.4826 * 1.5))
    assert indices[0] == pytest.approx(-0.5 / (1.4826 * 1.5))  # larger than typical: negative, never flagged
    assert most_anomalous(norms, log_scale=False) == (5, pytest.approx(indices[5]))


def test_by_default_the_index_judges_log_norms_where_a_wide_spread_of_natural_masks_hides_less():
    """The Fashion-MNIST BadNets search of the anomaly module's docstring (norms in pixels, rounded)."""
    norms = [43, 85, 59, 5, 56, 53, 47, 106, 26, 95]
    logs = [math.log(v) for v in norms]
    median = statistics.median(logs)
    mad = statistics.median(abs(v - median) for v in logs)

    assert anomaly_indices(norms)[3] == pytest.approx((median - logs[3]) / (1.4826 * mad))
    assert most_anomalous(norms)[1] > 2 > most_anomalous(norms, log_scale=False)[1]
    assert anomaly_indices([0.0, 5.0, 5.0, 6.0])[0] > 0  # an empty mask has a finite index


def test_no_spread_gives_no_outlier_and_a_collapsed_mad_falls_back_to_the_mean_deviation():
    assert anomaly_indices([5.0, 5.0, 5.0, 5.0]) == [0.0] * 4
    assert anomaly_indices([3.0, 9.0]) == [0.0, 0.0]  # fewer than three classes: nothing to judge by
    fallback = anomaly_indices([10.0, 10.0, 10.0, 10.0, 2.0], log_scale=False)  # MAD 0, mean abs. deviation 1.6
    assert fallback[4] == pytest.approx(8.0 / (1.2533 * 1.6))
    assert most_anomalous([7.0, 7.0, 7.0]) == (0, 0.0)  # ties: the lowest class, index 0


def test_a_tight_cluster_of_clean_masks_is_an_outlier_by_mad_but_not_flagged():
    """The MAD of four similar masks collapses; the norm-ratio guard keeps that from flagging a clean model."""
    norms = [16.4, 13.1, 16.5, 15.7]
    suspect, index = most_anomalous(norms)
    assert suspect == 1 and index > 2
    assert norm_ratio(norms, 1) == pytest.approx(13.1 / 16.05)
    assert not is_flagged(index, norm_ratio(norms, 1))
    assert is_flagged(2.5, 0.3) and not is_flagged(1.9, 0.1)


def test_stamp_blends_pattern_where_the_mask_is_on():
    x = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1.0
    mask[0, 1, 1] = 0.5
    out = stamp(x, mask, torch.ones(1, 4, 4))
    assert out[:, 0, 0, 0].tolist() == [1.0, 1.0] and out[:, 0, 1, 1].tolist() == [0.5, 0.5]
    assert out.sum() == 3.0


# -- the search on tiny models -------------------------------------------------------------------------------------


# The data and arch fixtures are test_probes.py's stripe-orientation classes: the corners are free, so a
# corner patch is no natural feature.


def test_a_planted_3x3_patch_is_recovered(data, arch):
    train, test = data
    attack = AttackConfig("badnets", target=TARGET, poison_rate=0.2, seed=3, params={"size": 3})
    model = train_backdoored_model(arch, train, test, attack, TrainConfig(epochs=4, batch_size=32, lr=5e-3),
                                   device=CPU, seed=0).model

    result = search_triggers(model, train, test, 4, SEARCH)

    assert result.suspected_class == TARGET and result.flagged, result
    assert result.norm_ratio < 0.5 and result.anomaly_index >= 2
    assert result.mask[0][PATCH].max() > 0.5, "the recovered mask misses the planted patch"
    assert result.success.value >= 0.8 and result.success.n == int((test.y != TARGET).sum())
    assert result.mask.shape == (1, SIZE, SIZE) and result.pattern.shape == (1, SIZE, SIZE)
    assert len(result.mask_norms) == 4 and all(result.reached)


def test_a_clean_model_is_not_flagged(data, arch):
    train, test = data
    torch.manual_seed(0)
    model = build_classifier(arch)
    train_classifier(model, train.x, train.y, TrainConfig(epochs=4, batch_size=32, lr=5e-3), device=CPU, seed=0)
    before = [p.detach().clone() for p in model.parameters()]

    result = search_triggers(model, train, test, 4, SEARCH)

    assert not result.flagged, result
    assert result.norm_ratio > 0.5
    assert result.mask[0][PATCH].max() < 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the search changed the model"


def test_unlabelled_held_out_images_are_refused(data, arch):
    train, test = data
    with pytest.raises(ValueError, match="labels"):
        search_triggers(build_classifier(arch), train, ImageSet(test.x), 4, SEARCH)


# -- the verdict rule ----------------------------------------------------------------------------------------------


def trigger(on_surrogate: bool = False, success: float = 0.93, index: float = 3.1, ratio: float = 0.3,
            area: float = 0.01, calibrated: bool = True, probe_class: int | None = 2) -> TriggerFinding:
    return TriggerFinding(suspected_class=2, anomaly_index=index, norm_ratio=ratio, mask_fraction=area,
                          success=wilson(round(success * 300), 300), on_surrogate=on_surrogate, calibrated=calibrated,
                          probe_class=probe_class)


def test_a_recovered_trigger_never_leaves_no_evidence():
    verdict = conclude(sound(0.2, trigger=trigger())).verdict

    assert verdict["level"] in ("suspicious", "likely_backdoored") and verdict["probe_level"] == "no_evidence"
    assert verdict["level"] == verdict["combined"]["level"] and verdict["trigger_evidence"] is True
    assert "toward class class2" in verdict["headline"] and "93.0% of 300" in verdict["headline"]


@pytest.mark.parametrize("changes", [{"success": 0.79}, {"index": 1.9}, {"ratio": 0.6}, {"area": 0.19}])
def test_a_trigger_short_of_any_bar_is_not_evidence_on_its_own(changes):
    """Not recovered: it does not count, and the level is the combined score's own reading (no lift)."""
    verdict = conclude(sound(0.2, trigger=trigger(**changes))).verdict
    assert verdict["trigger_evidence"] is False
    assert verdict["level"] == verdict["combined"]["score_level"] == verdict["combined"]["level"]


def test_a_search_shorter_than_the_calibration_keeps_the_probe_reading_and_gives_no_combined_score():
    """A converging-looking but short search (tiny effort) is outside what the combined score was fitted on."""
    unconverged = trigger(success=0.97, index=1.2, ratio=0.7, area=0.2, calibrated=False)
    verdict = conclude(sound(0.2, trigger=unconverged)).verdict
    assert verdict["combined"] is None and verdict["level"] == verdict["probe_level"] == "no_evidence"
    # The same readings from a search as long as the zoo's would be scored (and, here, read as no evidence too).
    assert conclude(sound(0.2, trigger=trigger(success=0.97, index=1.2, ratio=0.7, area=0.2))).verdict["combined"]
    # A recovered trigger still never coexists with no_evidence, calibrated or not.
    lifted = conclude(sound(0.2, trigger=trigger(calibrated=False))).verdict
    assert lifted["combined"] is None and lifted["level"] == "suspicious" and lifted["trigger_evidence"] is True
    assert lifted["headline"].startswith("The probes alone read no evidence, but")


@pytest.mark.parametrize("probe_class", [5, None])
def test_a_trigger_toward_a_class_the_probes_do_not_suspect_is_reported_but_not_counted(probe_class):
    """A clean small CNN's universal patch toward an easy class looks like a recovered trigger; the probes' suspect
    is what tells it from a backdoor's (verdict.py)."""
    finding = trigger(probe_class=probe_class)
    assert finding.recovered and not finding.agrees_with_probes and not finding.counts

    verdict = conclude(sound(0.2, trigger=finding)).verdict

    assert verdict["level"] == verdict["combined"]["score_level"] == "no_evidence"
    assert verdict["trigger_evidence"] is False
    assert "recovered a small trigger toward class class2" in verdict["headline"]
    probes = "suspect no class" if probe_class is None else "point at class class5"
    assert f"Not counted: the probes {probes}" in verdict["headline"]


def test_a_trigger_found_on_the_surrogate_is_reported_but_does_not_move_the_verdict():
    verdict = conclude(sound(0.2, trigger=trigger(on_surrogate=True))).verdict
    assert verdict["level"] == "no_evidence" and verdict["trigger_evidence"] is False and verdict["combined"] is None
    assert "on the surrogate" in verdict["headline"] and "Not verified against the API" in verdict["headline"]


def test_a_tripped_gate_still_makes_the_verdict_inconclusive_and_names_the_trigger():
    inconclusive = conclude(sound(0.2, probe_images=1, trigger=trigger())).verdict
    assert inconclusive["level"] == "inconclusive" and "recovered a small trigger" in inconclusive["headline"]
    assert conclude(sound(0.2)).verdict["trigger_evidence"] is None


# -- the report ----------------------------------------------------------------------------------------------------


def detection_section(counts: bool = True) -> dict:
    return {
        "model": "submitted" if counts else "surrogate", "suspected_class": 3, "anomaly_index": 4.7,
        "anomaly_threshold": 2.0, "norm_ratio": 0.09, "max_norm_ratio": 0.5, "flagged": True,
        "success": {"value": 0.973, "n": 270, "low": 0.945, "high": 0.987}, "success_floor": 0.8,
        "max_mask_fraction": 0.1, "recovered": True, "agrees_with_probes": True, "counts_toward_verdict": counts,
        "mask_norms": [43.0, 85.0, 59.0, 5.0, 56.0, 53.0, 47.0, 106.0, 26.0, 95.0],
        "anomaly_indices": [0.6, -1.0, -0.2, 4.7, -0.1, 0.0, 0.3, -1.4, 1.6, -1.2], "reached": [True] * 10,
        "mask_fraction": 0.0064, "steps": 300, "images": 256, "seconds": 84.0, "image": "trigger-recovered.png",
    }


def test_the_report_shows_the_recovered_trigger_and_refuses_it_beside_no_evidence(tmp_path):
    from report_sample import sample_report

    from auditor.report import write_report
    from auditor.report.plots import image_grid
    from auditor.report.schema import ReportValidationError, validate_report

    report = sample_report()
    report["detection"] = detection_section()
    report["verdict"]["trigger_evidence"] = True
    report["images"] = [{"file": "trigger-recovered.png", "caption": "Recovered trigger"}]
    image_grid({"mask": torch.zeros(1, 1, 28, 28), "pattern": torch.ones(1, 1, 28, 28)}, tmp_path / "trigger-recovered.png")

    written = write_report(report, tmp_path)

    html = written["report.html"].read_text()
    assert "Trigger reverse-engineering" in html and "97.3% [94.5\u201398.7], n = 270" in html
    assert "3 Dress" in html and html.count('alt="Recovered trigger"') == 1
    assert "Combined detection score" not in html  # the sample carries no combined score
    combined = conclude(sound(0.2, trigger=trigger())).verdict["combined"]
    scored = write_report({**report, "verdict": {**report["verdict"], "combined": combined}}, tmp_path / "scored")
    html = scored["report.html"].read_text()
    assert f"{combined['score']:.2f}: reads " in html and "(likely backdoored \u2265 0.50, suspicious \u2265 0.50)" in html
    lifted = {**report, "verdict": {**report["verdict"], "level": "no_evidence", "probe_level": "no_evidence"}}
    with pytest.raises(ReportValidationError, match="never coexists with no_evidence"):
        validate_report(lifted)
    surrogate = {**lifted, "detection": detection_section(counts=False), "verdict": {**lifted["verdict"], "trigger_evidence": False}}
    assert validate_report(surrogate).detection.model == "surrogate"
    with pytest.raises(ReportValidationError, match="recovered"):
        validate_report({**report, "detection": {**detection_section(), "mask_fraction": 0.2}})
    with pytest.raises(ReportValidationError, match="the probes suspect"):
        validate_report({**report, "detection": {**detection_section(), "agrees_with_probes": False}})
    disagreeing = {**detection_section(), "agrees_with_probes": False, "counts_toward_verdict": False}
    assert validate_report({**lifted, "detection": disagreeing,
                            "verdict": {**lifted["verdict"], "trigger_evidence": False}}).detection.agrees_with_probes is False
