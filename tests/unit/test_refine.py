import copy

import pytest
import torch

from auditor.data import ImageSet
from auditor.errors import AuditCancelled
from auditor.evaluation import accuracy, model_predictor, predict_labels
from auditor.models import UNet, UNetConfig, load_checkpoint
from auditor.training import channels_last_if_accepted, weights_channels_last
from auditor.refine import (
    DefendedModel,
    RefineConfig,
    derangement,
    export_defended,
    inference_transform,
    remap_probabilities,
    train_refine,
)

CPU = torch.device("cpu")


def _config(**overrides) -> RefineConfig:
    base = dict(unet=UNetConfig(in_channels=1, width=4, depth=2), epochs=2, batch_size=32, pool_size=None, lr=3e-3)
    base.update(overrides)
    return RefineConfig(**base)


def _pool(tiny_data) -> ImageSet:
    return ImageSet(tiny_data[0].x[:192], None)


def _run(tiny_model, tiny_data, config, **kwargs):
    return train_refine(tiny_model, _pool(tiny_data), config, num_classes=4, device=CPU, seed=3, **kwargs)


def test_derangement_has_no_fixed_point_and_is_seeded():
    for seed in range(50):
        perm = derangement(10, seed)
        assert sorted(perm.tolist()) == list(range(10))
        assert not (perm == torch.arange(10)).any()
    assert torch.equal(derangement(10, 7), derangement(10, 7))


def test_remapping_sends_class_j_to_pi_j():
    mapping = torch.tensor([2, 0, 1])
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert remap_probabilities(probs, mapping).argmax(1).item() == 2
    assert remap_probabilities(probs, mapping).sum().item() == pytest.approx(1.0)


def test_same_seed_gives_identical_metrics_on_cpu(tiny_model, tiny_data):
    first = _run(tiny_model, tiny_data, _config())
    second = _run(tiny_model, tiny_data, _config())
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]
    assert strip(first.history) == strip(second.history)
    test = tiny_data[1]
    pred = [predict_labels(model_predictor(DefendedModel(r.transform, tiny_model, r.mapping), CPU), test) for r in (first, second)]
    assert torch.equal(pred[0], pred[1])


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_model, tiny_data):
    config = _config(epochs=3)
    uninterrupted = _run(tiny_model, tiny_data, config)
    _run(tiny_model, tiny_data, config, checkpoint_dir=tmp_path, stop_after_epochs=1)  # "crashes" after epoch 1
    resumed = _run(tiny_model, tiny_data, config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(uninterrupted.transform.state_dict().values(), resumed.transform.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in uninterrupted.history] == [h["loss"] for h in resumed.history]


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path, tiny_model, tiny_data):
    _run(tiny_model, tiny_data, _config(epochs=2), checkpoint_dir=tmp_path, stop_after_epochs=1)
    other = _run(tiny_model, tiny_data, _config(epochs=2, lr=1e-3), checkpoint_dir=tmp_path)
    assert other.resumed_from_epoch == 0


def test_cancellation_stops_within_one_batch(tiny_model, tiny_data):
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) > 3

    batches = []
    with pytest.raises(AuditCancelled):
        _run(tiny_model, tiny_data, _config(), should_cancel=should_cancel, on_progress=lambda s, d, t: batches.append(d))
    assert len(batches) == 3  # three batches ran, the fourth poll stopped the run before its batch


def test_the_model_trains_in_channels_last_and_comes_back_contiguous_even_when_cancelled(tiny_model, tiny_data):
    assert any(p.dim() == 4 for p in tiny_model.parameters())
    layouts = []

    def should_cancel() -> bool:
        layouts.append(all(p.is_contiguous(memory_format=torch.channels_last)
                           for p in tiny_model.parameters() if p.dim() == 4))
        return len(layouts) > 2

    with pytest.raises(AuditCancelled):
        _run(tiny_model, tiny_data, _config(), should_cancel=should_cancel)
    assert layouts == [True, True, True]  # f's max-pools are several times faster on channels-last activations
    assert all(p.is_contiguous() for p in tiny_model.parameters())  # safetensors and the exporters need this


class _FlattensWithView(torch.nn.Module):
    """User code of a common kind: ``view`` after a convolution works on contiguous activations only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.LazyLinear(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv(x), 2)
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_cannot_run_channels_last_is_left_as_it_came_and_still_defended(tiny_data):
    model = _FlattensWithView()
    images = tiny_data[0].x[:2].float() / 255
    model(images)  # materialise the lazy layer
    expected = model(images)

    assert not channels_last_if_accepted(model, images)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.equal(model(images), expected)
    result = _run(model, tiny_data, _config(epochs=1))
    assert result.history and all(p.is_contiguous() for p in model.parameters())


def test_a_model_that_came_channels_last_goes_back_channels_last(tiny_model, tiny_data):
    images = tiny_data[0].x[:2].float() / 255
    assert channels_last_if_accepted(tiny_model, images) and weights_channels_last(tiny_model)
    try:
        _run(tiny_model, tiny_data, _config(epochs=1))
        assert weights_channels_last(tiny_model)
    finally:
        tiny_model.to(memory_format=torch.contiguous_format)  # the fixture is shared


def test_exported_defended_model_matches_in_memory_predictions(tmp_path, tiny_model, tiny_data):
    result = _run(tiny_model, tiny_data, _config(epochs=1))
    defended = DefendedModel(result.transform, tiny_model, result.mapping).eval()
    x = tiny_data[1].x.float() / 255
    path = export_defended(defended, x[:2], tmp_path / "defended.pt")
    reloaded = load_checkpoint(path).module
    with torch.no_grad():
        expected, got = defended(x), reloaded(x)
    assert torch.equal(expected.argmax(1), got.argmax(1))
    assert torch.allclose(expected, got, atol=1e-5)


def test_refine_keeps_the_models_behaviour_on_clean_data(tiny_model, tiny_data):
    config = _config(epochs=6, unet=UNetConfig(in_channels=1, width=8, depth=2), pool_size=None)
    result = train_refine(tiny_model, ImageSet(tiny_data[0].x, None), config, num_classes=4, device=CPU, seed=3)
    defended = DefendedModel(result.transform, tiny_model, result.mapping)
    test = tiny_data[1]
    original = predict_labels(model_predictor(tiny_model, CPU), test)
    after = predict_labels(model_predictor(defended, CPU), test)
    assert accuracy(after, original) > 0.8
    assert result.history[-1]["fidelity"] > 0.8


def test_inference_transform_computes_t_in_channels_last_and_leaves_t_as_it_was():
    torch.manual_seed(0)
    transform = UNet(UNetConfig(in_channels=1, width=8, depth=2)).eval()
    images = torch.rand(16, 1, 28, 28)
    fast = inference_transform(transform)
    with torch.no_grad():
        expected, got = transform(images), fast(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.is_contiguous()  # the audited model may view() its input
    assert all(p.is_contiguous() for p in transform.parameters())  # the exported T keeps its layout
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    assert inference_transform(fast) is fast


def test_bf16_autocast_is_a_default_only_where_the_cpu_computes_it_natively():
    from auditor.runtime import _cpu_has_native_bf16, cpu_bf16_pays

    assert cpu_bf16_pays(torch.device("cuda")) is False  # GPU audits keep fp32 unless the spec asks
    assert cpu_bf16_pays(torch.device("cpu")) is _cpu_has_native_bf16()
    flags = open("/proc/cpuinfo").read().split()
    assert _cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_overlay_blends_each_training_image_with_another_of_its_batch_at_most_the_set_weight():
    from auditor.refine.trainer import _overlay

    x = torch.rand(64, 1, 28, 28)
    assert _overlay(x, 0.0, torch.Generator().manual_seed(0)) is x
    blended = _overlay(x, 0.2, torch.Generator().manual_seed(0))
    other = x.roll(1, dims=0)
    weight = ((blended - x) / (other - x)).flatten(1).median(1).values  # per image, the weight it got
    assert (weight >= 0).all() and (weight < 0.2).all() and weight.std() > 0.02  # each its own, drawn in [0, 0.2)
    torch.testing.assert_close(blended, torch.lerp(x, other, weight.view(-1, 1, 1, 1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="overlay"):
        _config(overlay=0.6)


def test_a_transform_trained_with_overlays_still_keeps_the_models_behaviour_on_clean_data(tiny_model, tiny_data):
    config = _config(epochs=6, unet=UNetConfig(in_channels=1, width=8, depth=2), overlay=0.2)
    result = train_refine(tiny_model, ImageSet(tiny_data[0].x, None), config, num_classes=4, device=CPU, seed=3)
    defended = DefendedModel(result.transform, tiny_model, result.mapping)
    test = tiny_data[1]
    original = predict_labels(model_predictor(tiny_model, CPU), test)
    assert accuracy(predict_labels(model_predictor(defended, CPU), test), original) > 0.8


def _images_f_answers_without_grad(model: torch.nn.Module) -> list[int]:
    """A running count of the images f answers outside autograd: the targets, as opposed to f(T(x)).

    The tests train contiguous, so no channels-last probe of f adds to the count.
    """
    seen = [0]

    def count(module, inputs):
        if not torch.is_grad_enabled():
            seen[0] += len(inputs[0])

    model.register_forward_pre_hook(count)
    return seen


def test_f_answers_each_pool_image_once_when_the_targets_do_not_change_between_epochs(tiny_model, tiny_data):
    model = copy.deepcopy(tiny_model)
    seen = _images_f_answers_without_grad(model)
    _run(model, tiny_data, _config(epochs=3, channels_last=False))
    assert seen[0] == 192  # once, not once per epoch


def test_f_answers_every_epoch_when_augmentation_or_a_refit_changes_its_targets(tiny_model, tiny_data):
    augmented = copy.deepcopy(tiny_model)
    seen = _images_f_answers_without_grad(augmented)
    _run(augmented, tiny_data, _config(epochs=3, augment=True, channels_last=False))
    assert seen[0] == 3 * 192

    refitted = copy.deepcopy(tiny_model)
    seen = _images_f_answers_without_grad(refitted)
    before = []

    def refit(epochs_done: int, transform) -> None:  # as a black-box audit refits its surrogate: f changes in place
        before.append(seen[0])
        with torch.no_grad():
            next(p for p in refitted.parameters()).mul_(0.5)

    result = _run(refitted, tiny_data, _config(epochs=3, channels_last=False), adapt_model=refit)
    assert before == [192, 2 * 192, 3 * 192] and seen[0] == 3 * 192  # no pass after the last refit
    assert len(result.history) == 3
