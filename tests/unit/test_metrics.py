import pytest
import torch

from auditor.data import ImageSet
from auditor.evaluation import asr_and_ra, confusion, per_class_accuracy, predict_labels


def test_asr_excludes_target_class_images():
    labels = torch.tensor([0, 0, 1, 2, 3])
    pred = torch.tensor([0, 0, 0, 2, 1])  # target 0: of the 3 non-target images one goes to 0, one stays right
    asr, ra = asr_and_ra(pred, labels, target=0)
    assert asr == pytest.approx(1 / 3)
    assert ra == pytest.approx(1 / 3)


def test_predictions_cover_every_image_including_a_partial_last_batch():
    data = ImageSet(torch.zeros(1001, 1, 4, 4, dtype=torch.uint8), torch.zeros(1001, dtype=torch.long))
    pred = predict_labels(lambda xb: torch.zeros(len(xb), dtype=torch.long), data, batch_size=100)
    assert len(pred) == 1001


def test_confusion_rows_are_true_classes_and_absent_classes_have_no_accuracy():
    labels = torch.tensor([0, 0, 1])
    pred = torch.tensor([0, 1, 1])
    matrix = confusion(pred, labels, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert per_class_accuracy(pred, labels, 3) == [0.5, 1.0, None]
