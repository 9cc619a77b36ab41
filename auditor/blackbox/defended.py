"""The defended pipeline of a black-box model, ``M ∘ API ∘ T``, measured on the real API.

For an API model, REFINE's transformation T is trained through a surrogate, but what
ships is T in front of the *real* API with the label mapping M behind it. The
surrogate is only an approximation, so every "after" number in the report (BA, ASR,
RA) comes from here: transformed images are sent to the API and its answers
remapped. Metric definitions are the shared ones in ``auditor.evaluation``.
"""

from __future__ import annotations

import torch
from torch import nn

from auditor.blackbox.client import ModelAPI
from auditor.data import ImageSet
from auditor.evaluation import AttackMetrics, Predictor, accuracy, asr_and_ra, predict_labels
from auditor.refine.defended import inference_transform


def _check_mapping(mapping: torch.Tensor, num_classes: int) -> torch.Tensor:
    """M must be a permutation of the API's K labels (REFINE uses a derangement, but any permutation evaluates)."""
    mapping = torch.as_tensor(mapping).long().cpu()
    if mapping.shape != (num_classes,) or not torch.equal(mapping.sort().values, torch.arange(num_classes)):
        raise ValueError(f"mapping must be a permutation of 0..{num_classes - 1}")
    return mapping


@torch.no_grad()
def transform_images(transform: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """T(x) clamped to [0, 1] on the CPU: what the API receives instead of x."""
    transform.eval()
    return transform(x.to(device).float()).clamp(0.0, 1.0).float().cpu()


def defended_api_probabilities(api: ModelAPI, transform: nn.Module, mapping: torch.Tensor, x: torch.Tensor,
                               *, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Defended probabilities q with ``q[:, π[j]] = API(T(x))[:, j]`` (one-hot rows for label-only APIs)."""
    mapping = _check_mapping(mapping, api.num_classes)
    probs = api.predict(transform_images(transform, x, device))
    remapped = torch.empty_like(probs)
    remapped[:, mapping] = probs
    return remapped


def defended_api_predict(api: ModelAPI, transform: nn.Module, mapping: torch.Tensor, x: torch.Tensor,
                         *, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Defended labels π[argmax API(T(x))] for float images in [0, 1] (N, C, H, W)."""
    mapping = _check_mapping(mapping, api.num_classes)
    return mapping[api.predict(transform_images(transform, x, device)).argmax(1)]


def api_predictor(api: ModelAPI) -> Predictor:
    """The undefended API as a ``Predictor`` (the "before" numbers)."""
    return lambda xb: api.predict(xb.float()).argmax(1)


def defended_api_predictor(api: ModelAPI, transform: nn.Module, mapping: torch.Tensor,
                           device: torch.device = torch.device("cpu")) -> Predictor:
    """``M ∘ API ∘ T`` as a ``Predictor`` for ``auditor.evaluation``."""
    mapping = _check_mapping(mapping, api.num_classes)
    transform = inference_transform(transform)
    return lambda xb: defended_api_predict(api, transform, mapping, xb, device=device)


def evaluate_defended_api(api: ModelAPI, transform: nn.Module, mapping: torch.Tensor, clean: ImageSet,
                          triggered: ImageSet | None = None, target: int | None = None, *,
                          device: torch.device = torch.device("cpu"), batch_size: int = 256) -> dict[str, float]:
    """BA on ``clean`` and, given triggered images labelled with their true class, ASR and RA for ``target``.

    Every image costs one API query (the client's cache makes repeats free); batches
    follow ``batch_size`` and the last one is never dropped.
    """
    if clean.y is None:
        raise ValueError("the clean test set needs labels for BA")
    if triggered is not None and (target is None or triggered.y is None):
        raise ValueError("ASR and RA need the target class and the triggered images' true labels")
    predict = defended_api_predictor(api, transform, mapping, device)
    ba = accuracy(predict_labels(predict, clean, batch_size), clean.y)
    if triggered is None:
        return {"ba": ba}
    asr, ra = asr_and_ra(predict_labels(predict, triggered, batch_size), triggered.y, int(target))
    return AttackMetrics(ba=ba, asr=asr, ra=ra).to_dict()
