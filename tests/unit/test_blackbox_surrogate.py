"""Surrogate distillation end to end: real server, real HTTP client, tiny synthetic data."""

from __future__ import annotations

import pytest
import torch

from auditor.blackbox import ApiConfig, DistillConfig, HttpModelAPI, ModelServer, agreement, distill_surrogate
from auditor.errors import AuditCancelled
from auditor.training import TrainConfig, predict_logits

LOOPBACK = ("127.0.0.1",)
CPU = torch.device("cpu")
FAST_TRAIN = TrainConfig(epochs=4, batch_size=32, lr=5e-3)


def open_client(server: ModelServer, protocol: str, query_budget: int | None = 1000) -> HttpModelAPI:
    config = ApiConfig(url=server.url, num_classes=4, protocol=protocol, batch_size=64, query_budget=query_budget)
    return HttpModelAPI(config, allowed_hosts=LOOPBACK)


@pytest.mark.parametrize(("protocol", "labels_only"), [("v1", False), ("v2", False), ("v1", True), ("v2", True)])
def test_distillation_over_http_stays_in_budget_and_imitates_the_api(tiny_data, tiny_arch, tiny_model, protocol,
                                                                     labels_only):
    pool, test = tiny_data
    config = DistillConfig(query_budget=240, holdout_fraction=0.25, selection="random", train=FAST_TRAIN)
    with ModelServer(tiny_model, protocol=protocol, labels_only=labels_only) as server:
        with open_client(server, protocol, query_budget=300) as api:
            result = distill_surrogate(api, pool, tiny_arch, config, device=CPU, seed=0)
            served = server.stats()["queries"]
            assert api.queries_used == served == 240
            assert result.counters["queries_used"] == 240
    assert len(result.queried.unique()) == 240
    assert result.output_kind == ("labels" if labels_only else "probabilities")
    assert result.used_soft_labels is not labels_only
    assert result.agreement["holdout_images"] == 60
    assert result.agreement["holdout"] >= 0.85
    # the surrogate also agrees with the teacher on unseen test images (checked locally, no queries)
    teacher = predict_logits(tiny_model, test.x, device=CPU).argmax(1)
    assert (predict_logits(result.model, test.x, device=CPU).argmax(1) == teacher).float().mean() >= 0.85


@pytest.mark.parametrize("selection", ["uncertainty", "balanced"])
def test_two_round_selection_spends_exactly_the_budget_on_distinct_images(tiny_data, tiny_arch, tiny_model, selection):
    pool, _ = tiny_data
    config = DistillConfig(query_budget=200, selection=selection, train=TrainConfig(epochs=2, batch_size=32, lr=5e-3))
    with ModelServer(tiny_model) as server, open_client(server, "v1") as api:
        result = distill_surrogate(api, pool, tiny_arch, config, device=CPU, seed=1)
        assert server.stats()["queries"] == 200 == api.queries_used
    assert len(result.queried) == 200 == len(result.queried.unique())
    assert result.agreement["holdout_images"] == 20  # from the random first round only: 20% of 100


def test_distillation_never_spends_more_than_the_client_has_left(tiny_data, tiny_arch, tiny_model):
    pool, _ = tiny_data
    config = DistillConfig(query_budget=400, train=TrainConfig(epochs=1, batch_size=16))
    with ModelServer(tiny_model) as server, open_client(server, "v2", query_budget=150) as api:
        result = distill_surrogate(api, pool, tiny_arch, config, device=CPU, seed=0)
        assert server.stats()["queries"] == 150 == api.queries_used
    assert len(result.queried) == 150


def test_agreement_on_clean_and_triggered_images_costs_one_query_per_new_image(tiny_data, tiny_arch, tiny_model):
    pool, test = tiny_data
    triggered = test.x.clone()
    triggered[:, :, -3:, -3:] = 255  # a white corner patch
    with ModelServer(tiny_model) as server, open_client(server, "v1") as api:
        # the teacher itself as the "surrogate": agreement must be perfect
        assert agreement(api, tiny_model, test.x, device=CPU) == 1.0
        assert agreement(api, tiny_model, triggered, device=CPU) == 1.0
        assert server.stats()["queries"] == 2 * len(test)
        agreement(api, tiny_model, test.x, device=CPU)  # cached
        assert server.stats()["queries"] == 2 * len(test)


def test_cancellation_stops_between_query_chunks(tiny_data, tiny_arch, tiny_model):
    pool, _ = tiny_data
    calls = {"n": 0}

    def cancel_after_first_chunk() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    config = DistillConfig(query_budget=200, query_batch=50, train=FAST_TRAIN)
    with ModelServer(tiny_model) as server, open_client(server, "v1") as api:
        with pytest.raises(AuditCancelled):
            distill_surrogate(api, pool, tiny_arch, config, device=CPU, seed=0, should_cancel=cancel_after_first_chunk)
        assert server.stats()["queries"] == 50


def test_progress_is_reported_for_queries_and_training(tiny_data, tiny_arch, tiny_model):
    pool, _ = tiny_data
    seen: list[tuple[str, int, int]] = []
    config = DistillConfig(query_budget=100, query_batch=50, train=TrainConfig(epochs=1, batch_size=40))
    with ModelServer(tiny_model) as server, open_client(server, "v1") as api:
        distill_surrogate(api, pool, tiny_arch, config, device=CPU, seed=0,
                          on_progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("surrogate_query", 100, 100) in seen
    assert seen[-1][0] == "surrogate_train" and seen[-1][1] == seen[-1][2]


@pytest.mark.parametrize("bad", [{"query_budget": 1}, {"holdout_fraction": 1.0}, {"selection": "greedy"},
                                 {"first_round_fraction": 0.0}])
def test_distill_config_validation(bad):
    with pytest.raises(ValueError):
        DistillConfig(**{"query_budget": 100, **bad})
