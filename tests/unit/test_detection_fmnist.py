"""The detection benchmark's analysis: whom its headline judges, and that its committed figures can be re-derived."""

import json

from auditor.detection.combined import COMBINED
from bench.common import RESULTS
from bench.detection_fmnist import _separation, analyse, audit_runs, readings_from_results


def _model(name: str, score: float, poisoned: bool, works: bool | None, verdict: str) -> dict:
    return {"name": name, "backdoored": poisoned, "implanted": works, "score_whitebox": score, "augmented": False,
            "verdict": verdict, "recovered": False, "recovered_asr": None, "candidate_asr": 0.9,
            "trigger_counts": False}


def test_the_headline_judges_working_backdoors_and_all_poisoned_counts_the_ones_that_never_implanted():
    entries = [_model("badnets-0", 0.9, True, True, "likely_backdoored"),
               _model("lc-0", 0.1, True, False, "no_evidence"),  # trained on poisoned data, trigger never worked
               _model("clean-0", 0.2, False, None, "no_evidence"),
               _model("clean-1", 0.3, False, None, "no_evidence")]

    figures = _separation(entries, COMBINED)

    assert (figures["n_backdoored"], figures["n_clean"]) == (1, 2)
    assert figures["roc_auc"] == 1.0 and figures["tpr_at_5fpr"] == 1.0
    assert figures["tpr_likely"] == {"rate": 1.0, "n": 1}
    every = figures["all_poisoned"]
    assert every["n_backdoored"] == 2 and every["roc_auc"] == 0.5 and every["tpr_likely"] == {"rate": 0.5, "n": 2}
    assert figures["not_implanted"] == ["lc-0"]


def test_the_committed_detection_figures_follow_from_the_per_model_readings_they_keep():
    """bench/results/detection_fmnist.json is re-derived, section by section, by ``--readings-from`` itself."""
    path = RESULTS / "detection_fmnist.json"
    saved = json.loads(path.read_text())
    parts, manifest, labels = readings_from_results(path)

    again = json.loads(json.dumps(analyse(parts, manifest, COMBINED, labels)))

    assert len(parts) == len(saved["models"]) == saved["zoo"]["audited"]
    assert {k: saved[k] for k in again} == again
    assert sum(run["models"] for run in audit_runs(path)) == len(parts)  # every reading's audit run is named
