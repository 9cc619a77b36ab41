"""One detection score from the probe battery and the trigger search: P(the model carries a targeted backdoor).

The probes (auditor/evaluation/probes.py) see triggers that generic disturbances
fire (patches, blends, warps, rotations); the trigger search (trigger.py) sees a
class that a tiny stamped mask reaches. Each misses what the other catches, and
each alone has clean models near its threshold. A logistic model on four features
of the submitted model's audit combines them:

    probe_score      the battery's suspicion score before the defense (0-1)
    anomaly_index    robust standard deviations by which the smallest class mask is below the median (>= 0)
    log_norm_ratio   log of that mask's norm over the median class's (negative: smaller than typical)
    success          the recovered trigger's success on held-out images of the other classes (0-1)

Its output is a calibrated probability that the model carries a targeted backdoor,
*for models like the calibration zoo* (bench/zoo.py: small Fashion-MNIST
classifiers of three architectures, half of them backdoored by one of seven
attacks): with another base rate of backdoors or another kind of model the
number is a ranking more than a probability. The verdict thresholds were picked
on the calibration split and judged on the held-out split (bench/detection_fmnist.py,
bench/results/detection_fmnist.json, README "Backdoor detection score").

Pure Python: the verdict reads it without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ScoreLevel = Literal["likely_backdoored", "suspicious", "no_evidence"]
FEATURES = ("probe_score", "anomaly_index", "log_norm_ratio", "success")
#: Norm ratios are clamped here before the log, so an empty mask has a finite feature.
RATIO_FLOOR = 1e-3

#: The zoo's audits ran the quick effort's search (100 Adam steps per class over 256 images). A shorter search (the
#: tiny effort's 30 steps of 8 images) has not converged: its masks and success rates are outside what the
#: coefficients were fitted on, so such an audit keeps the probe score's reading and reports no combined score.
CALIBRATED_SEARCH_STEPS, CALIBRATED_SEARCH_IMAGES = 100, 256

MEANING = ("Probability that the model carries a targeted backdoor, from a logistic model on the probe score and "
           "the trigger search, fitted on a zoo of clean and backdoored Fashion-MNIST models (bench/zoo.py).")


@dataclass(frozen=True)
class CombinedModel:
    """Logistic coefficients on raw features and the two verdict thresholds on its probability."""

    intercept: float
    weights: dict[str, float] = field(default_factory=dict)
    likely: float = 0.9  # score at or above: likely_backdoored
    suspicious: float = 0.5  # score at or above: suspicious
    fitted_by: str = ""

    def score(self, values: list[float]) -> float:
        logit = self.intercept + sum(self.weights[name] * v for name, v in zip(FEATURES, values))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))

    def level(self, score: float, trigger_recovered: bool = False) -> ScoreLevel:
        """The score's reading; a recovered trigger lifts no_evidence to suspicious (never further)."""
        if score >= self.likely:
            return "likely_backdoored"
        if score >= self.suspicious or trigger_recovered:
            return "suspicious"
        return "no_evidence"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combined_verdict(probe_score: float, anomaly_index: float, norm_ratio: float, success: float,
                     recovered: bool) -> dict[str, Any]:
    """The report's ``verdict.combined``: the shipped model's score, its level (lifted by a recovered trigger),
    the score's own level, what it means and where its numbers come from."""
    values = features({"probe_score": probe_score, "anomaly_index": anomaly_index, "norm_ratio": norm_ratio,
                       "success": success})
    score = COMBINED.score(values)
    return {"score": round(score, 4), "level": COMBINED.level(score, recovered), "score_level": COMBINED.level(score),
            "meaning": MEANING, "likely_threshold": COMBINED.likely, "suspicious_threshold": COMBINED.suspicious,
            "fitted_by": COMBINED.fitted_by}


def features(reading: dict[str, Any]) -> list[float]:
    """The model's feature vector from one audit's readings (report field names; missing search values count as
    "nothing found": index 0, ratio 1, success 0)."""
    ratio = reading.get("norm_ratio")
    return [
        float(reading.get("probe_score") or 0.0),
        float(reading.get("anomaly_index") or 0.0),
        math.log(max(float(ratio if ratio is not None else 1.0), RATIO_FLOOR)),
        float(reading.get("success") or 0.0),
    ]


#: Fitted on 2026-12-02 by ``python -m bench.detection_fmnist --analyse-only --refit`` (L2-regularised logistic
#: regression on standardised features, penalty 1) on the calibration split of the zoo: 12 clean models and the 10
#: poisoned ones whose trigger works (ASR >= 50%; 4 that did not implant left out), audited at quick effort with the
#: full battery's four-corner patches (182 probes). The thresholds were picked on the same split: ``likely`` the cut
#: above every clean calibration model but at least 0.5; no ``suspicious`` tier below it, because 12 clean models
#: cannot place a cut at a 5% false-positive rate. Below 0.5 the score reads no evidence; a recovered trigger toward
#: the class the probes suspect still lifts that to suspicious. The previous fit (five patch positions, 2026-11-30)
#: missed a four-corner label-consistent backdoor and let universal patches lift 3 of 12 clean models of the zoo's
#: second build; this one was frozen before the third build was audited (bench/results/detection_fmnist.json).
#: ``success`` carries most of the weight but only separates in combination: every clean model's best candidate
#: trigger also reaches 0.93-0.99 here.
COMBINED = CombinedModel(
    intercept=-21.4433,
    weights={"probe_score": 3.9838, "anomaly_index": 0.126, "log_norm_ratio": -0.8987, "success": 19.0294},
    likely=0.5,
    suspicious=0.5,
    fitted_by="bench/detection_fmnist.py --refit, zoo calibration split (22 models), 2026-12-02",
)
