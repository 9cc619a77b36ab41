"""The defended model's deployable files: each reloads on its own runtime and answers like the model."""

from __future__ import annotations

import hashlib
import warnings

import onnxruntime
import pytest
import torch

from auditor.models import UNetConfig, export_torchscript, load_checkpoint
from auditor.pipeline.refine import EXPORT_CHECK_IMAGES, export_check_images
from auditor.refine import DefendedModel, RefineConfig, export_defended_formats, train_refine
from auditor.refine.export import INPUT_NAME, OUTPUT_NAME, compare_predictions, export_onnx, export_program

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def defended(tiny_model, tiny_data) -> DefendedModel:
    config = RefineConfig(unet=UNetConfig(in_channels=1, width=4, depth=2), epochs=1, batch_size=32, pool_size=None)
    from auditor.data import ImageSet

    result = train_refine(tiny_model, ImageSet(tiny_data[0].x[:192], None), config, num_classes=4, device=CPU, seed=3)
    return DefendedModel(result.transform, tiny_model, result.mapping).eval()


@pytest.fixture(scope="module")
def test_images(tiny_data) -> torch.Tensor:
    return tiny_data[1].x.float() / 255


@pytest.fixture(scope="module")
def exports(defended, test_images, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecation noise from our own exports
        return {e.format: e for e in export_defended_formats(defended, test_images, tmp_path_factory.mktemp("exports"))}


def test_every_format_is_written_verified_and_hashed(exports, test_images) -> None:
    assert set(exports) == {"torch_export", "onnx", "torchscript"}
    for exported in exports.values():
        assert exported.verified, exported.error
        assert exported.check.images == len(test_images) and exported.check.agreement == 1.0
        assert exported.sha256 == hashlib.sha256(exported.path.read_bytes()).hexdigest()
        entry = exported.to_report()
        assert entry["verified"] and entry["check"]["passed"] and entry["name"] == exported.path.name
    assert exports["torchscript"].deprecated and not exports["onnx"].deprecated


def test_pt2_program_reloads_and_agrees_with_the_model_on_every_test_image(exports, defended, test_images) -> None:
    program = torch.export.load(str(exports["torch_export"].path)).module()
    with torch.no_grad():
        expected, got = defended(test_images), program(test_images)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert float((got - expected).abs().max()) == pytest.approx(exports["torch_export"].check.max_abs_diff, abs=1e-6)


def test_onnx_model_runs_in_onnxruntime_and_agrees_on_every_test_image(exports, defended, test_images) -> None:
    session = onnxruntime.InferenceSession(str(exports["onnx"].path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: test_images.numpy()})[0])
    with torch.no_grad():
        expected = defended(test_images)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert float((got - expected).abs().max()) < 1e-4
    odd_batch = session.run([OUTPUT_NAME], {INPUT_NAME: test_images[:3].numpy()})[0]
    assert odd_batch.shape == (3, 4)  # the batch dimension is dynamic


def test_torchscript_is_still_loadable_by_the_products_checkpoint_loader(exports, defended, test_images) -> None:
    reloaded = load_checkpoint(exports["torchscript"].path).module
    with torch.no_grad():
        assert torch.equal(reloaded(test_images).argmax(1), defended(test_images).argmax(1))


def test_a_format_the_model_cannot_take_is_reported_not_raised(tiny_model, defended, test_images, tmp_path) -> None:
    scripted = load_checkpoint(export_torchscript(tiny_model, test_images[:2], tmp_path / "m.pt")).module
    around_script = DefendedModel(defended.transform, scripted, defended.mapping)

    for exported, name in ((export_program(around_script, test_images, tmp_path / "defended.pt2"), "defended.pt2"),
                           (export_onnx(around_script, test_images, tmp_path / "defended.onnx"), "defended.onnx")):
        assert not exported.verified and exported.path is None and exported.sha256 is None
        assert "TorchScript" in exported.error and not (tmp_path / name).exists()
        assert exported.to_report()["error"] == exported.error


def test_comparison_counts_disagreements_and_the_largest_difference() -> None:
    images = torch.zeros(4, 1, 2, 2)
    reference = lambda x: torch.tensor([[0.0, -1.0]]).repeat(len(x), 1)  # noqa: E731
    flipped_one = lambda x: torch.tensor([[0.0, -1.0], [0.0, -1.0], [0.0, -1.0], [-2.0, 0.0]])  # noqa: E731

    check = compare_predictions(reference(images), flipped_one, images)

    assert check.agreement == 0.75 and not check.passed
    assert check.max_abs_diff == pytest.approx(2.0)


def test_an_audit_checks_its_exports_on_at_most_2000_images_spread_over_the_whole_test_set() -> None:
    sorted_by_class = torch.arange(10).repeat_interleave(1000).view(-1, 1, 1, 1)  # an upload sorted by label
    picked = export_check_images(sorted_by_class)
    assert len(picked) == EXPORT_CHECK_IMAGES == 2000
    assert torch.bincount(picked.flatten()).tolist() == [200] * 10  # every class, evenly
    small = torch.rand(300, 1, 4, 4)
    assert export_check_images(small) is small  # fewer than the limit: all of them
