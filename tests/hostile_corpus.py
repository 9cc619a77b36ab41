"""Hostile checkpoints, built on the fly (nothing binary is committed).

Each case is a file a hostile user could upload. Every payload that runs code creates
its marker file, so "the marker never appears" is the proof that nothing executed it;
the other cases (zip tricks, absurd shapes, lying headers) are refused for what they
declare. Used by the unit, integration and e2e tests and by ``bench.hostile_checkpoints``.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class RunsCode:
    """Unpickling this runs ``code`` (which creates the marker); the result is what ``code`` evaluates to."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def touch(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def touches_then_raises(marker: Path) -> RunsCode:
    return RunsCode(f"{touch(marker)} or 1/0")


def touches_then_returns_tensor(marker: Path) -> RunsCode:
    return RunsCode(f"{touch(marker)} or __import__('torch').zeros(4)")


class _TinyNet(nn.Module):
    """Small enough to export in a second; ``scale`` is a tensor constant, as .pt2 archives store them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2, 10)
        self.scale = torch.ones(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3))) * self.scale


def _example() -> torch.Tensor:
    return torch.rand(2, 1, 28, 28)


def _rewrite_zip(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None],
                 extra: dict[str, bytes] | None = None) -> Path:
    """Copy an archive entry by entry through ``edit`` (None drops the entry), then add ``extra``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            data = edit(info.filename, src.read(info))
            if data is not None:
                out.writestr(info, data)
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return target


def _torch_save_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _export(folder: Path, dynamic: bool = False) -> Path:
    path = folder / ("dynamic.pt2" if dynamic else "clean.pt2")
    shapes = {"x": {0: torch.export.Dim("batch", min=2, max=64)}} if dynamic else None
    program = torch.export.export(_TinyNet().eval(), (_example(),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def _torchscript(folder: Path) -> Path:
    path = folder / "clean_script.pt"
    torch.jit.save(torch.jit.script(_TinyNet().eval()), str(path))
    return path


def _state_dict(folder: Path) -> Path:
    path = folder / "clean_state.pt"
    torch.save(_TinyNet().state_dict(), path)
    return path


# ---------------------------------------------------------------------------- the cases


def raw_pickle(folder: Path, marker: Path) -> Path:
    path = folder / "raw.pkl"
    path.write_bytes(pickle.dumps(touches_then_returns_tensor(marker)))
    return path


def torch_save_zip(folder: Path, marker: Path) -> Path:
    path = folder / "objects.pt"
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3), "evil": touches_then_returns_tensor(marker)}, path)
    return path


def torch_save_legacy(folder: Path, marker: Path) -> Path:
    path = folder / "legacy.pt"
    torch.save({"evil": touches_then_returns_tensor(marker)}, path, _use_new_zipfile_serialization=False)
    return path


def _pt2_pickled_constant(folder: Path, payload: RunsCode, name: str) -> Path:
    """A real export whose tensor constant is marked use_pickle and replaced by a payload (issue 12's RCE)."""
    clean = _export(folder)

    def edit(entry: str, data: bytes) -> bytes:
        if entry.endswith("_constants_config.json"):
            config = json.loads(data)
            for meta in config["config"].values():
                meta["use_pickle"] = True
            return json.dumps(config).encode()
        if "/data/constants/tensor_" in entry:
            return _torch_save_bytes(payload)
        return data

    return _rewrite_zip(clean, folder / name, edit)


def pt2_pickled_constant_raises(folder: Path, marker: Path) -> Path:
    return _pt2_pickled_constant(folder, touches_then_raises(marker), "constant_raises.pt2")


def pt2_pickled_constant_tensor(folder: Path, marker: Path) -> Path:
    return _pt2_pickled_constant(folder, touches_then_returns_tensor(marker), "constant_tensor.pt2")


def pt2_pickled_sample_inputs(folder: Path, marker: Path) -> Path:
    """Sample inputs are unpickled with a fallback to weights_only=False."""
    clean = _export(folder)
    payload = _torch_save_bytes(((touches_then_returns_tensor(marker),), {}))
    return _rewrite_zip(clean, folder / "sample_inputs.pt2",
                        lambda entry, data: payload if "/data/sample_inputs/" in entry else data)


def pt2_sympy_expression(folder: Path, marker: Path) -> Path:
    """No pickle at all: torch.export.load hands each symbolic size's text to sympy.sympify (eval)."""
    clean = _export(folder, dynamic=True)

    def edit(entry: str, data: bytes) -> bytes:
        if "/models/" in entry:
            program = json.loads(data)
            _replace_key(program, "expr_str", f"{touch(marker)} or 1")
            return json.dumps(program).encode()
        return data

    return _rewrite_zip(clean, folder / "sympy.pt2", edit)


def pt2_guards_code(folder: Path, marker: Path) -> Path:
    """ExportedProgram.module() turns guards_code into Python source and exec()s it."""
    clean = _export(folder)

    def edit(entry: str, data: bytes) -> bytes:
        if "/models/" in entry:
            program = json.loads(data)
            program["guards_code"] = [f"{touch(marker)} or True"]
            return json.dumps(program).encode()
        return data

    return _rewrite_zip(clean, folder / "guards.pt2", edit)


def _replace_key(node: object, key: str, value: object) -> None:
    if isinstance(node, dict):
        for k in node:
            if k == key:
                node[k] = value
            else:
                _replace_key(node[k], key, value)
    elif isinstance(node, list):
        for item in node:
            _replace_key(item, key, value)


def _payload_pickle(marker: Path) -> bytes:
    return pickle.dumps(touches_then_returns_tensor(marker), protocol=2)


def torchscript_tampered_constants(folder: Path, marker: Path) -> Path:
    clean = _torchscript(folder)
    return _rewrite_zip(clean, folder / "script_constants.pt",
                        lambda entry, data: _payload_pickle(marker) if entry.endswith("/constants.pkl") else data)


def torchscript_tampered_data(folder: Path, marker: Path) -> Path:
    clean = _torchscript(folder)
    return _rewrite_zip(clean, folder / "script_data.pt",
                        lambda entry, data: _payload_pickle(marker) if entry.endswith("/data.pkl") else data)


def zip_slip_dotdot(folder: Path, marker: Path) -> Path:
    """An entry that an extractor would write to the marker's path."""
    clean = _state_dict(folder)
    prefix = "clean_state/" + "../" * (len(marker.parts) + 2)
    return _rewrite_zip(clean, folder / "slip.pt", lambda e, d: d, {prefix + str(marker).lstrip("/"): b"x"})


def zip_slip_absolute(folder: Path, marker: Path) -> Path:
    clean = _state_dict(folder)
    archive = folder / "absolute.pt"
    _rewrite_zip(clean, archive, lambda e, d: d)
    with zipfile.ZipFile(archive, "a") as out:  # ZipFile.writestr strips a leading slash; ZipInfo keeps it
        info = zipfile.ZipInfo("placeholder")
        info.filename = str(marker)
        out.writestr(info, b"x")
    return archive


def zip_symlink(folder: Path, marker: Path) -> Path:
    clean = _state_dict(folder)
    info = zipfile.ZipInfo("clean_state/data/link")
    info.external_attr = (0o120777 << 16)
    archive = _rewrite_zip(clean, folder / "symlink.pt", lambda e, d: d)
    with zipfile.ZipFile(archive, "a") as out:
        out.writestr(info, str(marker))
    return archive


def torch_absurd_shape(folder: Path, marker: Path) -> Path:
    """A state dict whose tensor claims 2**40 elements of a 4-byte storage."""
    clean = folder / "shape_source.pt"
    torch.save({"conv.weight": torch.zeros(1)}, clean)

    def edit(entry: str, data: bytes) -> bytes:
        if entry.endswith("/data.pkl"):
            return data.replace(b"K\x01\x85", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85", 1)  # size (1,) -> (2**40,)
        return data

    return _rewrite_zip(clean, folder / "absurd_shape.pt", edit)


def _safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", header_len if header_len is not None else len(raw)) + raw + data


def safetensors_absurd_shape(folder: Path, marker: Path) -> Path:
    path = folder / "absurd.safetensors"
    path.write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, b"\0" * 16))
    return path


def safetensors_past_the_end(folder: Path, marker: Path) -> Path:
    path = folder / "past_end.safetensors"
    path.write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}, b"\0" * 16))
    return path


def safetensors_huge_header(folder: Path, marker: Path) -> Path:
    path = folder / "huge_header.safetensors"
    path.write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 1 << 40))
    return path


def safetensors_overlap(folder: Path, marker: Path) -> Path:
    path = folder / "overlap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path.write_bytes(_safetensors(header, b"\0" * 24))
    return path


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], Path]


CASES = tuple(Case(fn.__name__, fn) for fn in (
    raw_pickle, torch_save_zip, torch_save_legacy,
    pt2_pickled_constant_raises, pt2_pickled_constant_tensor, pt2_pickled_sample_inputs, pt2_sympy_expression,
    pt2_guards_code, torchscript_tampered_constants, torchscript_tampered_data,
    zip_slip_dotdot, zip_slip_absolute, zip_symlink,
    torch_absurd_shape, safetensors_absurd_shape, safetensors_past_the_end, safetensors_huge_header, safetensors_overlap,
))


def build_corpus(folder: Path) -> list[tuple[Case, Path, Path]]:
    """(case, file, marker) for every case, in ``folder``; markers go to ``folder/markers``."""
    markers = folder / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    built = []
    for case in CASES:
        work = folder / case.name
        work.mkdir(exist_ok=True)
        marker = markers / case.name
        built.append((case, case.build(work, marker), marker))
    return built
