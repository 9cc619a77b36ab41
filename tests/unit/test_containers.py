"""Static checks of checkpoint containers: every hostile case refused before a loader runs,
every real format still accepted, and the corpus itself proven real (torch's own loaders
run its payloads)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from hostile_corpus import CASES, _example, _rewrite_zip, _TinyNet, build_corpus, touches_then_returns_tensor

from auditor.errors import AuditError
from auditor.models import ArchConfig, build_classifier, export_torchscript, load_checkpoint, save_classifier
from auditor.models.containers import ContainerLimits, TensorPicklePolicy, inspect_checkpoint
from auditor.models.pickles import PickleRefused, evaluate_pickle


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    return {case.name: (path, marker) for case, path, marker in build_corpus(tmp_path_factory.mktemp("corpus"))}


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_every_hostile_checkpoint_is_refused_by_the_checks_and_the_loader_without_running(corpus, name):
    path, marker = corpus[name]
    for check in (inspect_checkpoint, load_checkpoint):
        with pytest.raises(AuditError) as info:
            check(path)
        assert info.value.code.value == "invalid_checkpoint"
    assert not marker.exists()


def test_the_corpus_is_real_torch_own_loaders_run_its_payloads(corpus, tmp_path):
    """Without the checks these files execute code: the markers prove the cases test something."""
    ran = {}
    for name in ("pt2_pickled_constant_tensor", "pt2_pickled_sample_inputs", "pt2_sympy_expression", "pt2_guards_code"):
        path, marker = corpus[name]
        try:
            torch.export.load(str(path)).module()(_example())
        except Exception:  # noqa: BLE001 -- some payloads break the load after running
            pass
        ran[name] = marker.exists()
    path, marker = corpus["torch_save_zip"]
    torch.load(path, weights_only=False)
    ran["torch_save_zip"] = marker.exists()
    assert all(ran.values()), ran


def test_real_checkpoints_of_every_format_pass_and_load(tmp_path, tiny_model, tiny_arch, tiny_data):
    x = tiny_data[1].x[:4].float() / 255
    files = {
        "safetensors": save_classifier(tiny_model, tiny_arch, tmp_path / "m.safetensors"),
        "torchscript": export_torchscript(tiny_model, x[:2], tmp_path / "scripted.pt"),
        "state_dict": tmp_path / "sd.pt",
        "export": tmp_path / "m.pt2",
    }
    torch.save({"state_dict": tiny_model.state_dict(), "epoch": 3}, files["state_dict"])
    torch.export.save(torch.export.export(tiny_model.eval(), (x,)), str(files["export"]))
    traced = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(tiny_model.eval(), x), str(traced))
    dynamic = tmp_path / "dynamic.pt2"
    program = torch.export.export(_TinyNet().eval(), (_example(),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2, max=64)}})
    torch.export.save(program, str(dynamic))
    for fmt, path in [*files.items(), ("torchscript", traced), ("export", dynamic)]:
        assert inspect_checkpoint(path).format == fmt, path
        assert load_checkpoint(path, arch=tiny_arch).format == fmt, path
    declared = inspect_checkpoint(files["safetensors"]).tensors
    assert {k: v.shape for k, v in declared.items()} == {k: tuple(v.shape) for k, v in tiny_model.state_dict().items()}


def test_pickle_evaluator_refuses_every_way_of_reaching_a_callable():
    policy = TensorPicklePolicy(lambda name: None, "data", ContainerLimits())
    payload = touches_then_returns_tensor(Path("/nonexistent/marker"))
    for protocol in (0, 2, 4, 5):  # GLOBAL, INST/REDUCE and STACK_GLOBAL forms
        with pytest.raises(PickleRefused, match="eval"):
            evaluate_pickle(pickle.dumps(payload, protocol=protocol), policy)
    assert evaluate_pickle(pickle.dumps({"a": [1, 2.5, "x", (None, True)]}, protocol=4), policy) == {
        "a": [1, 2.5, "x", (None, True)]}
    for opcodes in (b"\x82\x01.", b"cos\nsystem\n(S'id'\ntR.", b"(cos\nsystem\nS'id'\ni."):  # EXT1, GLOBAL+REDUCE, INST
        with pytest.raises(PickleRefused):
            evaluate_pickle(opcodes, policy)


def test_exported_graph_calling_python_functions_is_refused(tmp_path):
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(_TinyNet().eval(), (_example(),)), str(clean))

    def edit(entry: str, data: bytes) -> bytes:
        if "/models/" in entry:
            program = json.loads(data)
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"
            return json.dumps(program).encode()
        return data

    with pytest.raises(AuditError, match="torch.serialization.os.system"):
        inspect_checkpoint(_rewrite_zip(clean, tmp_path / "target.pt2", edit))


def test_safetensors_weights_that_do_not_fit_their_recorded_architecture_are_refused_statically(tmp_path):
    arch = ArchConfig("small_cnn", width=4)
    path = save_classifier(build_classifier(arch), arch, tmp_path / "m.safetensors")
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    header["__metadata__"]["arch"] = json.dumps({**json.loads(header["__metadata__"]["arch"]), "width": 8})
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + path.read_bytes()[8 + header_len:])
    from web.api.audits.uploads import check_checkpoint

    with pytest.raises(AuditError, match="do not fit"):
        check_checkpoint(path)


def test_zip_entries_that_lie_about_their_size_are_refused(tmp_path):
    clean = tmp_path / "sd.pt"
    torch.save(_TinyNet().state_dict(), clean)
    data = bytearray(clean.read_bytes())
    header = data.rfind(b"sd/data.pkl") - 46  # its central-directory record (the name's last occurrence)
    assert data[header:header + 4] == b"PK\x01\x02"
    data[header + 24:header + 28] = (2**31 - 1).to_bytes(4, "little")  # uncompressed size: 2 GiB
    lying = tmp_path / "lying.pt"
    lying.write_bytes(bytes(data))
    with pytest.raises(AuditError, match="declares sizes"):
        inspect_checkpoint(lying)
