"""Backdoor detection by trigger reverse-engineering (white-box; API audits run it on the surrogate).

    trigger.py   search_triggers(): a mask and pattern per class, the anomalous class, its trigger's success
    anomaly.py   the MAD anomaly index of the per-class mask norms (pure Python)
"""

from auditor.detection.anomaly import (
    ANOMALY_THRESHOLD,
    MAX_NORM_RATIO,
    anomaly_indices,
    is_flagged,
    most_anomalous,
    norm_ratio,
)
from auditor.detection.trigger import TriggerSearchConfig, TriggerSearchResult, search_triggers, stamp, trigger_success

__all__ = [
    "ANOMALY_THRESHOLD",
    "MAX_NORM_RATIO",
    "TriggerSearchConfig",
    "TriggerSearchResult",
    "anomaly_indices",
    "is_flagged",
    "most_anomalous",
    "norm_ratio",
    "search_triggers",
    "stamp",
    "trigger_success",
]
