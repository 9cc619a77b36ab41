"""Probe battery and suspicion score: determinism, query accounting, separation on tiny data, odd predictors."""

from __future__ import annotations

import pytest
import torch

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.data import ImageSet
from auditor.evaluation import model_predictor
from auditor.evaluation.probes import (
    ProbeConfig,
    build_battery,
    probe_statistics,
    suspicion_score,
)
from auditor.models import ArchConfig, build_classifier
from auditor.training import TrainConfig, train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: threads only add overhead

CPU = torch.device("cpu")
TARGET = 1
SIZE = 20


def striped_images(n: int, seed: int) -> ImageSet:
    """Four classes told apart by stripe orientation in the image centre, on a noisy background.

    conftest's classes are bright squares near the corners, where a white
    corner patch *is* a class's natural feature, so any probe would find a
    "trigger" in a clean model. Orientation classes leave the corners free, so
    a corner patch pulls everything to one class only if the model was taught
    a trigger.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, SIZE, SIZE, generator=gen) * 0.3
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    stripes = [rows % 3 == 0, cols % 3 == 0, (rows + cols) % 3 == 0, (rows - cols) % 3 == 0]
    for k, stripe in enumerate(stripes):
        x[y == k, :, 5:15, 5:15] += 0.6 * stripe.float()
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y)


@pytest.fixture(scope="module")
def data() -> tuple[ImageSet, ImageSet]:
    return striped_images(480, seed=0), striped_images(160, seed=1)


@pytest.fixture(scope="module")
def arch() -> ArchConfig:
    return ArchConfig("small_cnn", in_channels=1, num_classes=4, image_size=SIZE, mean=(0.3,), std=(0.3,), width=8)


@pytest.fixture(scope="module")
def clean_model(data, arch):
    train, _ = data
    torch.manual_seed(0)
    model = build_classifier(arch)
    train_classifier(model, train.x, train.y, TrainConfig(epochs=4, batch_size=32, lr=5e-3), device=CPU, seed=0)
    return model


@pytest.fixture(scope="module")
def backdoored_model(data, arch):
    train, test = data
    attack = AttackConfig("badnets", target=TARGET, poison_rate=0.2, seed=3, params={"size": 4})
    result = train_backdoored_model(
        arch, train, test, attack, TrainConfig(epochs=4, batch_size=32, lr=5e-3), device=CPU, seed=0
    )
    return result.model


#: A reduced battery; warps stay mild because a 2-pixel warp erases 3-pixel stripes (a natural flip, not a trigger).
SMALL = ProbeConfig(
    num_images=160, random_patches=1, blend_patterns=2, warp_fields=1, warp_strengths=(0.5,), noise_draws=1
)


def test_battery_is_deterministic_for_a_seed(data):
    _, test = data
    images = test.x[:8].float() / 255
    first = build_battery(ProbeConfig(seed=7), test.shape)
    second = build_battery(ProbeConfig(seed=7), test.shape)
    other = build_battery(ProbeConfig(seed=8), test.shape)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert torch.equal(a.apply(images), b.apply(images)), a.name
    random_ones = [i for i, p in enumerate(first) if "rand" in p.name or p.family in {"blend", "noise", "warp"}]
    assert any(not torch.equal(first[i].apply(images), other[i].apply(images)) for i in random_ones)


def test_probes_keep_shape_and_range(data):
    _, test = data
    images = test.x[:8].float() / 255
    for probe in build_battery(ProbeConfig(), test.shape):
        out = probe.apply(images).clamp(0, 1)
        assert out.shape == images.shape and torch.isfinite(out).all(), probe.name
        assert not torch.equal(out, images) or probe.family == "warp", probe.name


def test_four_corner_patch_stamps_every_corner_and_nothing_else():
    config = ProbeConfig(families=("patch",), patch_sizes=(3,), patch_fills=("checker",), random_patches=0,
                         patch_positions=("corners",), patch_margin=1)
    (probe,) = build_battery(config, (1, 10, 10))
    out = probe.apply(torch.full((2, 1, 10, 10), 0.5))
    checker = ((torch.arange(3).view(3, 1) + torch.arange(3)) % 2).float()
    stamped = torch.zeros(10, 10, dtype=torch.bool)
    for rows in (slice(1, 4), slice(6, 9)):
        for cols in (slice(1, 4), slice(6, 9)):
            assert torch.equal(out[:, 0, rows, cols], checker.expand(2, 3, 3)), (rows, cols)
            stamped[rows, cols] = True
    assert probe.name == "patch3-corners-checker"
    assert (out[:, 0][:, ~stamped] == 0.5).all()


def test_report_is_deterministic_and_counts_queries(data, clean_model):
    _, test = data
    predict = model_predictor(clean_model, CPU)
    calls: list[int] = []

    def counting(xb: torch.Tensor) -> torch.Tensor:
        calls.append(len(xb))
        return predict(xb)

    config = ProbeConfig(num_images=50, batch_size=32, random_patches=1, blend_patterns=2, warp_fields=1, noise_draws=1)
    first = suspicion_score(counting, test, config)
    second = suspicion_score(predict, test, config)
    assert first.to_dict() == second.to_dict()
    assert first.num_probes == len(build_battery(config, test.shape))
    assert first.queries == 50 * (first.num_probes + 1) == sum(calls)
    assert max(calls) <= 32


def test_backdoored_model_scores_higher_and_names_the_target(data, clean_model, backdoored_model):
    _, test = data
    clean = suspicion_score(model_predictor(clean_model, CPU), test, SMALL)
    backdoored = suspicion_score(model_predictor(backdoored_model, CPU), test, SMALL)
    assert backdoored.score >= clean.score + 0.4, (clean.to_dict(top_k=3), backdoored.to_dict(top_k=3))
    assert backdoored.suspicious and not clean.suspicious
    assert backdoored.suspect_class == TARGET
    assert backdoored.evidence[0].top_class == TARGET
    assert any(e.family == "patch" and "-br-" in e.probe for e in backdoored.evidence)  # where the trigger is
    assert set(backdoored.per_family) == set(SMALL.families)
    assert 0.0 <= clean.score <= 1.0


def test_constant_predictor_gets_a_defined_zero_score(data):
    _, test = data
    report = suspicion_score(lambda xb: torch.full((len(xb),), 2), test, SMALL)
    assert report.score == 0.0 and report.suspect_class is None and report.evidence == []
    assert not report.suspicious
    assert report.to_dict()["per_family"] == {f: 0.0 for f in SMALL.families}


def test_statistics_of_a_known_transition():
    clean = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    probed = torch.tensor([0, 3, 3, 3, 3, 3, 3, 3])
    probe = build_battery(ProbeConfig(families=("rotate",)), (1, 8, 8))[0]
    result = probe_statistics(probe, clean, probed, 4, ProbeConfig(min_class_images=1))
    assert result.flip_rate == pytest.approx(5 / 8)
    assert result.top_class == 3 and result.concentration == 1.0
    assert result.target_rate == pytest.approx(5 / 6)
    assert result.breadth == pytest.approx(0.5)  # the worst third of {0: 1/2, 1: 1, 2: 1} is class 0
    assert result.source_classes == 3


def test_config_validation():
    with pytest.raises(ValueError):
        ProbeConfig(num_images=0)
    with pytest.raises(ValueError):
        ProbeConfig(families=("patch", "laser"))
    with pytest.raises(ValueError):
        ProbeConfig(blend_alphas=(0.0,))
    with pytest.raises(ValueError):
        ProbeConfig(threshold=1.5)
