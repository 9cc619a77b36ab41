"""Black-box models: SSRF-guarded HTTP clients, a reference server, surrogate distillation, defended evaluation."""

from auditor.blackbox.client import ApiConfig, HttpModelAPI, ModelAPI, detect_output_kind
from auditor.blackbox.defended import (
    api_predictor,
    defended_api_predict,
    defended_api_predictor,
    defended_api_probabilities,
    evaluate_defended_api,
)
from auditor.blackbox.refit import RefitConfig, SurrogateRefitter, refit_epochs
from auditor.blackbox.server import Fault, ModelServer, run_server
from auditor.blackbox.ssrf import ALLOWED_HOSTS_ENV, CheckedURL, check_url, resolve_and_check
from auditor.blackbox.surrogate import DistillConfig, SurrogateResult, agreement, distill_surrogate

__all__ = [
    "ALLOWED_HOSTS_ENV",
    "ApiConfig",
    "CheckedURL",
    "DistillConfig",
    "Fault",
    "HttpModelAPI",
    "ModelAPI",
    "ModelServer",
    "RefitConfig",
    "SurrogateRefitter",
    "SurrogateResult",
    "agreement",
    "api_predictor",
    "check_url",
    "defended_api_predict",
    "defended_api_predictor",
    "defended_api_probabilities",
    "detect_output_kind",
    "distill_surrogate",
    "evaluate_defended_api",
    "refit_epochs",
    "resolve_and_check",
    "run_server",
]
