"""Classifier training: the layout it trains in never leaks into the weights it hands back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.models import build_classifier
from auditor.errors import AuditCancelled
from auditor.training import TrainConfig, train_classifier

CPU = torch.device("cpu")


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("channels_last", [True, False])
def test_trained_weights_come_back_contiguous_and_save_as_safetensors(tmp_path, tiny_data, tiny_arch, channels_last):
    train, test = tiny_data
    torch.manual_seed(0)
    model = build_classifier(tiny_arch)
    config = TrainConfig(epochs=3, batch_size=32, lr=5e-3, channels_last=channels_last)

    train_classifier(model, train.x, train.y, config, device=CPU, seed=0)

    assert not model.training and all(p.is_contiguous() for p in model.parameters())
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))  # refuses non-contiguous tensors
    assert load_file(str(tmp_path / "m.safetensors")).keys() == model.state_dict().keys()
    with torch.no_grad():
        accuracy = (model(test.x.float() / 255).argmax(1) == test.y).float().mean().item()
    assert accuracy > 0.8  # it learned, in either layout


def test_the_weights_train_in_channels_last_and_are_restored_after_a_cancel(tiny_data, tiny_arch):
    train, _ = tiny_data
    model = build_classifier(tiny_arch)
    seen: list[bool] = []

    def cancel_on_second_check() -> bool:
        seen.append(all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights(model)))
        return len(seen) > 1

    with pytest.raises(AuditCancelled):
        train_classifier(model, train.x, train.y, TrainConfig(epochs=1, batch_size=32), device=CPU, seed=0,
                         should_cancel=cancel_on_second_check)

    assert seen and all(seen)  # channels-last while training...
    assert all(p.is_contiguous() for p in conv_weights(model))  # ...contiguous once it stopped, even by a cancel
