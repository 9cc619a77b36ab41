"""Label-only trigger detection: a planted 3x3 patch named from label answers alone, a hard query cap, a seed.

The data are oriented gratings over the whole 16x16 image, so a normal class's boundary
spreads over the image and a corner patch is no natural feature. The models train on
three noisy copies of each image: without noise a tiny CNN's smallest change to any
class is a faint ripple over the gratings, smaller than the trigger (the module
docstring of auditor/detection/label_only.py has the measurements). The search's seed 0
is one of the four of six seeds at which it named the target here: the test pins the
method's behaviour at that seed, not a rate.
"""

from __future__ import annotations

import math

import pytest
import torch

from auditor.detection.label_only import LabelOnlyConfig, images_within, label_only_detection, queries_for
from auditor.evaluation import model_predictor
from auditor.models import ArchConfig, build_classifier
from auditor.training import TrainConfig, train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: threads only add overhead

CPU = torch.device("cpu")
SIZE, CLASSES, TARGET = 16, 5, 1
PATCH_CENTRE = (SIZE - 3, SIZE - 3)  # the 3x3 patch covers rows and columns 12-14
#: One image per class, five rounds of 80 directions: the standard effort's shape (2,275 queries for five classes).
SEARCH = LabelOnlyConfig(images_per_class=1, iterations=5, directions=80, seed=0)


def gratings(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a sine grating at angle k x 36 degrees with a random phase, plus pixel noise; images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    angle = y.float() * math.pi / CLASSES
    phase = torch.rand(n, generator=gen) * 2 * math.pi
    along = rows[None] * torch.sin(angle)[:, None, None] + cols[None] * torch.cos(angle)[:, None, None]
    x = 0.5 + 0.25 * torch.sin(along * math.pi / 2 + phase[:, None, None]) + 0.1 * torch.randn(n, SIZE, SIZE,
                                                                                               generator=gen)
    return x.clamp(0, 1)[:, None], y


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 checkerboard one pixel in from the bottom-right corner."""
    out = x.clone()
    out[:, :, SIZE - 4:SIZE - 1, SIZE - 4:SIZE - 1] = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    return out


def train(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    noisy = torch.cat([(x + 0.15 * torch.randn(x.shape, generator=gen)).clamp(0, 1) for _ in range(3)])
    torch.manual_seed(0)
    arch = ArchConfig("small_cnn", in_channels=1, num_classes=CLASSES, image_size=SIZE, mean=(0.5,), std=(0.3,),
                      width=8)
    model = build_classifier(arch)
    train_classifier(model, (noisy * 255).round().to(torch.uint8), y.repeat(3),
                     TrainConfig(epochs=4, batch_size=32, lr=5e-3), device=CPU, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    return gratings(200, seed=1)


@pytest.fixture(scope="module")
def backdoored(held_out) -> torch.nn.Module:
    x, y = gratings(600, seed=0)
    poisoned = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:90]  # 15%
    x[poisoned], y[poisoned] = stamp(x[poisoned]), TARGET
    model = train(x, y)
    hx, hy = held_out
    with torch.no_grad():
        assert (model(stamp(hx[hy != TARGET])).argmax(1) == TARGET).float().mean() > 0.9, "the backdoor did not take"
    return model


@pytest.fixture(scope="module")
def clean() -> torch.nn.Module:
    return train(*gratings(600, seed=0))


class Counting:
    """The real model's labels, with every image it is sent counted (what an API would bill)."""

    def __init__(self, model: torch.nn.Module):
        self.predict, self.images = model_predictor(model, CPU), 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.predict(x)


def test_the_backdoor_target_has_the_sharpest_map_at_the_patch_and_a_clean_model_does_not(backdoored, clean,
                                                                                          held_out):
    x, y = held_out
    found = label_only_detection(Counting(backdoored), x, y, CLASSES, SEARCH, 10_000)
    control = label_only_detection(Counting(clean), x, y, CLASSES, SEARCH, 10_000)

    assert found.suspected_class == TARGET, found.peaks
    assert found.anomaly_index > control.anomaly_index, (found.anomaly_index, control.anomaly_index)
    row, col = found.peak_pixels[TARGET]
    assert abs(row - PATCH_CENTRE[0]) <= 1 and abs(col - PATCH_CENTRE[1]) <= 1, found.peak_pixels
    assert found.maps.shape == (CLASSES, SIZE, SIZE) and found.images == (1,) * CLASSES


def test_it_never_sends_more_than_its_cap_and_shrinks_to_fit(backdoored, held_out):
    x, y = held_out
    wide = LabelOnlyConfig(images_per_class=3, iterations=2, directions=20, seed=0)
    cap = queries_for(CLASSES, 2, wide) + 5  # room for two images per class, not three
    api = Counting(backdoored)

    result = label_only_detection(api, x, y, CLASSES, wide, cap)

    assert images_within(cap, CLASSES, wide) == 2 and max(result.images) <= 2
    assert api.images == result.queries <= cap and result.query_cap == cap
    starved = Counting(backdoored)
    with pytest.raises(ValueError, match="cannot pay for one image per class"):
        label_only_detection(starved, x, y, CLASSES, wide, queries_for(CLASSES, 1, wide) - 1)
    assert starved.images == 0


def test_a_seed_gives_the_same_answer_and_another_seed_other_directions(backdoored, held_out):
    x, y = held_out
    small = LabelOnlyConfig(images_per_class=1, iterations=2, directions=20, seed=3)
    first = label_only_detection(Counting(backdoored), x, y, CLASSES, small, 2000)
    again = label_only_detection(Counting(backdoored), x, y, CLASSES, small, 2000)
    other = label_only_detection(Counting(backdoored), x, y, CLASSES, LabelOnlyConfig(
        images_per_class=1, iterations=2, directions=20, seed=4), 2000)

    assert torch.equal(first.maps, again.maps) and first.peaks == again.peaks and first.queries == again.queries
    assert not torch.equal(first.maps, other.maps)


@pytest.mark.parametrize("bad", [{"directions": 0}, {"iterations": 0}, {"delta": 0.0}, {"step_tries": -1}])
def test_a_config_that_cannot_search_is_refused(bad):
    with pytest.raises(ValueError):
        LabelOnlyConfig(**bad)


def test_the_benchmark_budget_is_the_smallest_whose_plan_runs_the_detection_within_5000_queries():
    """bench/detection_fmnist.py --blackbox-labels audits the zoo with spec fields only, at this budget."""
    from bench.detection_fmnist import _blackbox_separation, label_only_budget, label_only_spec
    from auditor.pipeline import FASHION_MNIST, plan_audit
    from auditor.spec import parse_spec

    url = "http://127.0.0.1:9/v1/models/model:predict"
    budget = label_only_budget("quick")
    plan = plan_audit(parse_spec(label_only_spec("quick", url, budget)), FASHION_MNIST)
    assert plan.label_only is not None and plan.queries.detection == plan.label_only.queries <= 5000
    assert plan_audit(parse_spec(label_only_spec("quick", url, budget - 1)), FASHION_MNIST).label_only is None
    held = [{"score_blackbox": probe, "backdoored": b, "blackbox_queries": 3100, "blackbox_probe_level": level,
             "blackbox_probe_suspected": 1, "label_only_index": index, "label_only_queries": 2290,
             "label_only_suspected_class": 1, "target": 1 if b else None, "implanted": works}
            for probe, index, level, b, works in ((0.9, 3.0, "likely_backdoored", True, True),
                                                  (0.1, 0.4, "no_evidence", False, None),
                                                  (0.5, 0.8, "no_evidence", True, False),
                                                  (0.4, 0.9, "no_evidence", False, None))]
    figures = _blackbox_separation(held)
    # The headline judges the working backdoor against the clean models; the poisoned model whose trigger never
    # worked counts only in all_poisoned.
    assert figures["roc_auc"] == 1.0 and figures["queries_per_model"] == 3100 and figures["tpr_at_5fpr"] == 1.0
    assert figures["n_backdoored"] == 1 and figures["tpr_flagged"] == {"rate": 1.0, "n": 1}
    assert figures["fpr_flagged"] == {"rate": 0.0, "n": 2}
    every = figures["all_poisoned"]
    assert every["n_backdoored"] == 2 and every["tpr_flagged"] == {"rate": 0.5, "n": 2} and every["roc_auc"] == 1.0
    index = figures["label_only_index"]
    assert index["roc_auc"] == 1.0 and index["queries_per_model"] == 2290 and index["named_target"] == 1
