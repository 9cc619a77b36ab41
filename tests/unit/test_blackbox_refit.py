"""Surrogate refits during REFINE: real server, real HTTP client, tiny synthetic data."""

from __future__ import annotations

import pytest
import torch

from auditor.blackbox import (ApiConfig, DistillConfig, HttpModelAPI, ModelServer, RefitConfig, SurrogateRefitter,
                              distill_surrogate, refit_epochs)
from auditor.blackbox.refit import STATE_NAME
from auditor.data import ImageSet
from auditor.models import UNetConfig
from auditor.refine import RefineConfig, train_refine
from auditor.training import TrainConfig

CPU = torch.device("cpu")
FAST_TRAIN = TrainConfig(epochs=3, batch_size=32, lr=5e-3)
REFINE = RefineConfig(unet=UNetConfig(in_channels=1, width=4, depth=2), epochs=3, batch_size=32, pool_size=None)


def open_client(server: ModelServer, query_budget: int) -> HttpModelAPI:
    config = ApiConfig(url=server.url, num_classes=4, protocol="v1", batch_size=64, query_budget=query_budget)
    return HttpModelAPI(config, allowed_hosts=("127.0.0.1",))


@pytest.mark.parametrize(("epochs", "rounds", "expected"), [(6, 4, [1, 2, 3, 4]), (6, 2, [1, 3]), (3, 4, [1, 2]),
                                                            (1, 3, []), (10, 3, [1, 4, 7])])
def test_refits_follow_epochs_and_never_come_after_the_last(epochs, rounds, expected):
    assert refit_epochs(epochs, rounds) == expected


@pytest.mark.parametrize("labels_only", [False, True])
def test_refits_spend_their_budget_on_transformed_images_and_resume_without_paying_twice(
        tiny_data, tiny_arch, tiny_model, tmp_path, labels_only):
    pool, _ = tiny_data
    pool = ImageSet(pool.x, None)
    refit = RefitConfig(query_budget=90, rounds=2, epochs=1)
    with ModelServer(tiny_model, protocol="v1", labels_only=labels_only) as server:
        with open_client(server, query_budget=300) as api:
            surrogate = distill_surrogate(api, pool, tiny_arch, DistillConfig(query_budget=200, train=FAST_TRAIN),
                                          device=CPU, seed=0)
            distilled = api.queries_used
            untouched = {k: v.clone() for k, v in surrogate.model.state_dict().items()}
            refitter = SurrogateRefitter(api, surrogate, pool, REFINE.epochs, refit, device=CPU, seed=0,
                                         state_dir=tmp_path)
            result = train_refine(surrogate.model, pool, REFINE, num_classes=4, device=CPU, seed=0,
                                  adapt_model=refitter)
            assert [r["epoch"] for r in refitter.rounds] == [1, 2]
            assert [r["queries"] for r in refitter.rounds] == [45, 45]
            assert api.queries_used - distilled == refitter.queries_used == 90
            assert server.stats()["queries"] == api.queries_used
            # The surrogate changed, and it stays frozen for whoever uses it next.
            assert any(not torch.equal(untouched[k], v) for k, v in surrogate.model.state_dict().items())
            assert not any(p.requires_grad for p in surrogate.model.parameters())
            assert (tmp_path / STATE_NAME).exists()
            assert len(result.history) == REFINE.epochs

            resumed = SurrogateRefitter(api, surrogate, pool, REFINE.epochs, refit, device=CPU, seed=0,
                                        state_dir=tmp_path)
            assert resumed.done == [1, 2] and resumed.queries_used == 90
            spent = api.queries_used
            resumed(2, result.transform)
            assert api.queries_used == spent
