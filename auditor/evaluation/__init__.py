"""Metrics (BA, ASR, RA, agreement, confusion), probes and the suspicion score."""

from auditor.evaluation.metrics import (
    AttackMetrics,
    Predictor,
    accuracy,
    agreement,
    asr_and_ra,
    attack_metrics,
    confusion,
    model_predictor,
    per_class_accuracy,
    predict_labels,
)

__all__ = [
    "AttackMetrics",
    "Predictor",
    "accuracy",
    "agreement",
    "asr_and_ra",
    "attack_metrics",
    "confusion",
    "model_predictor",
    "per_class_accuracy",
    "predict_labels",
]

from auditor.evaluation.probes import (  # noqa: E402  (appended: the probe battery and suspicion score)
    Probe,
    ProbeConfig,
    ProbeResult,
    SuspicionReport,
    build_battery,
    run_battery,
    suspicion_score,
)

__all__ += [
    "Probe",
    "ProbeConfig",
    "ProbeResult",
    "SuspicionReport",
    "build_battery",
    "run_battery",
    "suspicion_score",
]
