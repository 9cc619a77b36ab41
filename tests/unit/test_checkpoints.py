import os
import pickle
import warnings
import zipfile

import pytest
import torch

from auditor.errors import AuditError
from auditor.models import export_torchscript, load_checkpoint, save_classifier


class _Payload:
    """Unpickling this object would create a marker file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_state_dict_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "evil": _Payload(str(marker))}, path)
    with pytest.raises(AuditError) as info:
        load_checkpoint(path)
    assert info.value.code.value == "invalid_checkpoint"
    assert not marker.exists()


def test_raw_pickle_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(AuditError) as info:
        load_checkpoint(path)
    assert info.value.code.value == "invalid_checkpoint"
    assert not marker.exists()


def test_random_bytes_and_foreign_zip_are_refused(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(1000))
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "hello")
    for path in (junk, foreign):
        with pytest.raises(AuditError) as info:
            load_checkpoint(path)
        assert info.value.code.value == "invalid_checkpoint"


def _same_predictions(a, b, x):
    with torch.no_grad():
        return torch.equal(a(x).argmax(1), b(x).argmax(1))


def test_safetensors_torchscript_and_state_dict_load_to_the_same_model(tmp_path, tiny_model, tiny_arch, tiny_data):
    x = tiny_data[1].x[:32].float() / 255
    st = save_classifier(tiny_model, tiny_arch, tmp_path / "m.safetensors")
    ts = export_torchscript(tiny_model, x[:2], tmp_path / "m.pt")
    sd = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), sd)
    loaded = {
        "safetensors": load_checkpoint(st),  # architecture read from the file's metadata
        "torchscript": load_checkpoint(ts),
        "state_dict": load_checkpoint(sd, arch=tiny_arch),
    }
    for fmt, model in loaded.items():
        assert model.format == fmt
        assert len(model.sha256) == 64
        assert _same_predictions(tiny_model, model.module, x), fmt


def test_torchscript_round_trip_keeps_torchs_deprecation_notice_out_of_the_logs(tmp_path, tiny_model, tiny_data):
    x = tiny_data[1].x[:2].float() / 255
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(export_torchscript(tiny_model, x, tmp_path / "m.pt"))
    assert not [str(w.message) for w in caught if "torch.jit" in str(w.message)]


def test_bare_weights_without_architecture_are_refused(tmp_path, tiny_model):
    path = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(AuditError, match="architecture"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path, tiny_model, tiny_arch):
    from dataclasses import replace

    path = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(AuditError) as info:
        load_checkpoint(path, arch=replace(tiny_arch, width=16))
    assert info.value.code.value == "invalid_checkpoint"


def test_torch_export_program_loads(tmp_path, tiny_model, tiny_data):
    x = tiny_data[1].x[:4].float() / 255
    program = torch.export.export(tiny_model.eval(), (x,))
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    loaded = load_checkpoint(path)
    assert loaded.format == "export"
    assert _same_predictions(tiny_model, loaded.module, x)
