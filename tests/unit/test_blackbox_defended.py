"""M ∘ API ∘ T evaluated by querying the real API with transformed images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auditor.blackbox import (
    ApiConfig,
    HttpModelAPI,
    ModelServer,
    defended_api_predict,
    defended_api_probabilities,
    evaluate_defended_api,
)
from auditor.data import ImageSet
from auditor.refine import DefendedModel, derangement, inverse
from auditor.training import predict_logits

LOOPBACK = ("127.0.0.1",)
CPU = torch.device("cpu")
TARGET = 0


class CornerBackdoor(nn.Module):
    """A backdoored model: a white 3x3 bottom-right corner sends any image to TARGET."""

    def __init__(self, clean: nn.Module):
        super().__init__()
        self.clean = clean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.clean(x)
        triggered = x[:, :, -3:, -3:].flatten(1).min(1).values > 0.99
        boost = torch.zeros_like(logits)
        boost[:, TARGET] = 100.0
        return torch.where(triggered[:, None], logits + boost, logits)


class BlankCorner(nn.Module):
    """A hand-made T that paints the corner dark: destroys this trigger, keeps the class squares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, -3:, -3:] = 0.1
        return x


class PermuteOutputs(nn.Module):
    """The model f' = π⁻¹ ∘ f: with M = π in front, the defended labels are the model's own."""

    def __init__(self, model: nn.Module, mapping: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("inv", inverse(mapping))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        permuted = torch.empty_like(logits)
        permuted[:, self.inv] = logits
        return permuted


def triggered_copy(data: ImageSet) -> ImageSet:
    x = data.x.clone()
    x[:, :, -3:, -3:] = 255
    return ImageSet(x, data.y)


def open_client(server: ModelServer) -> HttpModelAPI:
    return HttpModelAPI(ApiConfig(url=server.url, num_classes=4, batch_size=64), allowed_hosts=LOOPBACK)


@pytest.mark.parametrize("labels_only", [False, True])
def test_defended_labels_over_http_equal_the_local_defended_model(tiny_data, tiny_model, labels_only):
    _, test = tiny_data
    backdoored = CornerBackdoor(tiny_model).eval()
    mapping = derangement(4, seed=3)
    x = test.x[:40].float() / 255
    local = DefendedModel(BlankCorner(), backdoored, mapping).eval()
    with ModelServer(backdoored, labels_only=labels_only) as server, open_client(server) as api:
        remote = defended_api_predict(api, BlankCorner(), mapping, x)
        probs = defended_api_probabilities(api, BlankCorner(), mapping, x)
        assert server.stats()["queries"] == 40  # the second call was answered from the cache
    with torch.no_grad():
        assert torch.equal(remote, local(x).argmax(1))
    assert torch.equal(probs.argmax(1), remote)


def test_defended_metrics_show_the_trigger_disabled_and_accuracy_kept(tiny_data, tiny_model):
    _, test = tiny_data
    mapping = derangement(4, seed=5)
    api_model = PermuteOutputs(CornerBackdoor(tiny_model), mapping).eval()
    triggered = triggered_copy(test)
    clean_ba = (predict_logits(tiny_model, test.x, device=CPU).argmax(1) == test.y).float().mean().item()
    with ModelServer(api_model) as server, open_client(server) as api:
        before = evaluate_defended_api(api, nn.Identity(), mapping, test, triggered, TARGET)
        after = evaluate_defended_api(api, BlankCorner(), mapping, test, triggered, TARGET)
        assert server.stats()["queries"] == api.queries_used <= 4 * len(test)
    assert before["asr"] == 1.0 and before["ra"] == 0.0
    assert before["ba"] == pytest.approx(clean_ba)
    assert after["asr"] < 0.1 and after["ra"] > 0.85
    assert after["ba"] >= clean_ba - 0.05


def test_ba_only_when_no_triggered_set_is_given(tiny_data, tiny_model):
    _, test = tiny_data
    mapping = derangement(4, seed=0)
    with ModelServer(PermuteOutputs(tiny_model, mapping).eval()) as server, open_client(server) as api:
        result = evaluate_defended_api(api, nn.Identity(), mapping, test, batch_size=50)
    assert set(result) == {"ba"} and result["ba"] > 0.85


def test_a_mapping_that_is_not_a_permutation_is_refused(tiny_data, tiny_model):
    with ModelServer(tiny_model) as server, open_client(server) as api:
        with pytest.raises(ValueError):
            defended_api_predict(api, nn.Identity(), torch.tensor([1, 1, 2, 3]), torch.rand(2, 1, 16, 16))
        assert server.stats()["queries"] == 0
