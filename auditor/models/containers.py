"""Static checks of a checkpoint's container: what a file claims, read without loading it.
(Over 400 lines: one checker per container format, side by side, so what is refused reads in one place.)

A model file is a program. Before any loader sees a submitted file (and in the web
process instead of any loader) this module reads its container as data:

* **Zip archives** (TorchScript, ``torch.save``, ``torch.export`` .pt2): entry names
  (absolute, ``..``, backslashes, links, duplicates), declared sizes and compression
  ratios, entry count and total size, one top-level folder as torch writes it.
* **Every pickle inside** (``data.pkl``, ``constants.pkl``, ``*.debug_pkl``, the
  pickled weights, constants and sample inputs of a .pt2) is evaluated symbolically
  (``auditor.models.pickles``) against an allowlist: tensors rebuilt from the archive's
  own storage records, ``OrderedDict`` and plain values; TorchScript pickles may also
  name the archive's own ``__torch__`` classes. Each tensor's declared shape, strides
  and offset must fit its storage record, so an absurd shape is refused before
  anything is allocated.
* **torch.export .pt2**: ``torch.export.load`` (torch 2.14) unpickles weights and
  constants marked ``use_pickle``, custom and opaque objects, sample inputs (falling
  back to ``weights_only=False``) and legacy payloads, loads AOTInductor shared
  libraries, evaluates every ``expr_str`` of the graph with ``sympy.sympify`` (Python
  ``eval``), and turns any ``torch.*`` / ``operator.*`` name into a graph call. Only
  archives whose pickles hold plain tensors, whose graph calls registered torch
  operators and whose symbolic expressions are arithmetic on shape symbols pass.
* **safetensors**: the header's size, JSON, dtypes, shapes and byte ranges (inside the
  file, no overlaps, matching dtype x shape).

Everything refused raises ``AuditError(invalid_checkpoint)`` with the reason.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from auditor.archives import expands_too_much, unsafe_entry_reason
from auditor.errors import AuditError, ErrorCode
from auditor.models.pickles import Global, PickleRefused, evaluate_pickle


@dataclass(frozen=True)
class ContainerLimits:
    """Caps on what a checkpoint may declare; a legitimate classifier is far below each."""

    max_file_bytes: int = 1 << 30
    max_entries: int = 20_000
    max_total_bytes: int = 2 << 30  # all entries, uncompressed
    max_pickle_bytes: int = 64 << 20
    max_json_bytes: int = 64 << 20
    max_tensor_elements: int = 1 << 31
    max_dims: int = 16
    max_safetensors_header: int = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor declares: enough to check it against an architecture without loading it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class CheckpointInfo:
    """What the static checks learned about a file that passed them."""

    format: str  # torchscript | export | safetensors | state_dict
    tensors: dict[str, TensorSpec] | None = None  # bare weights: name -> declared tensor
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata


def invalid(message: str, **detail: object) -> AuditError:
    return AuditError(ErrorCode.INVALID_CHECKPOINT, message, dict(detail))


def inspect_checkpoint(path: str | Path, limits: ContainerLimits = ContainerLimits()) -> CheckpointInfo:
    """Classify a file by its bytes and check its container; never deserializes it."""
    path = Path(path)
    if not path.is_file():
        raise invalid(f"Checkpoint file {path.name!r} does not exist.")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise invalid(f"The checkpoint is larger than the {limits.max_file_bytes >> 20} MiB limit.", size=size)
    with open(path, "rb") as handle:
        head = handle.read(16)
        if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(handle):
            return _inspect_zip(handle, limits)
        if _looks_like_safetensors(head):
            return _inspect_safetensors(handle, size, limits)
    if head[:1] == b"\x80":
        raise invalid("The file is a pickle (or a legacy torch.save file); pickles are refused, never loaded.")
    raise invalid(
        "Unrecognised checkpoint format. Upload TorchScript (torch.jit.save), a torch.export .pt2, "
        "safetensors with an architecture, or a zip-format state dict (torch.save)."
    )


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0


# ---------------------------------------------------------------------------- zip archives


class _Archive:
    """A zip whose central directory passed the checks, read with size caps."""

    def __init__(self, source: BinaryIO, limits: ContainerLimits, label: str = "checkpoint"):
        self.limits = limits
        self.label = label
        try:
            self.zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise invalid(f"The {label} is not a readable zip archive: {exc}") from None
        source.seek(0, io.SEEK_END)
        self.size = source.tell()
        self.entries = self._checked_entries()
        self.prefix = self._common_prefix()

    def _checked_entries(self) -> dict[str, zipfile.ZipInfo]:
        infos = self.zip.infolist()
        if len(infos) > self.limits.max_entries:
            raise invalid(f"The {self.label} archive has {len(infos)} entries (limit {self.limits.max_entries}).")
        entries: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            reason = unsafe_entry_reason(info)
            if reason is not None:
                raise invalid(f"The {self.label} archive entry {info.filename!r} {reason}.", entry=info.filename)
            if info.filename in entries:
                raise invalid(f"The {self.label} archive holds {info.filename!r} twice.", entry=info.filename)
            self._check_sizes(info)
            total += info.file_size
            if total > self.limits.max_total_bytes:
                raise invalid(f"The {self.label} archive expands past {self.limits.max_total_bytes >> 20} MiB.")
            entries[info.filename] = info
        return entries

    def _check_sizes(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if info.flag_bits & 0x1:
            raise invalid(f"The {self.label} archive entry {name!r} is encrypted.", entry=name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise invalid(f"The {self.label} archive entry {name!r} uses an unsupported compression.", entry=name)
        stored_mismatch = info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size
        if stored_mismatch or info.header_offset + info.compress_size > self.size:
            raise invalid(f"The {self.label} archive entry {name!r} declares sizes its bytes do not have.", entry=name)
        if expands_too_much(info):
            raise invalid(f"The {self.label} archive entry {name!r} expands too much (a decompression bomb?).", entry=name)

    def _common_prefix(self) -> str:
        """torch writes every entry under one folder; anything beside it is not torch's."""
        tops = {PurePosixPath(name).parts[0] for name in self.entries}
        if len(tops) != 1 or any("/" not in name for name in self.entries):
            raise invalid(f"The {self.label} archive is not laid out as torch writes it (one top-level folder).")
        return tops.pop() + "/"

    def names(self) -> Iterator[str]:
        """Entry names below the top-level folder."""
        for name in self.entries:
            yield name[len(self.prefix):]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.entries

    def record_size(self, name: str) -> int | None:
        info = self.entries.get(self.prefix + name)
        return None if info is None else info.file_size

    def read(self, name: str, cap: int) -> bytes:
        info = self.entries[self.prefix + name]
        if info.file_size > cap:
            raise invalid(f"{name!r} in the {self.label} archive is larger than {cap >> 20} MiB.", entry=name)
        try:
            with self.zip.open(info) as handle:
                data = handle.read(cap + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise invalid(f"{name!r} in the {self.label} archive cannot be read: {exc}", entry=name) from None
        if len(data) > cap:
            raise invalid(f"{name!r} in the {self.label} archive is larger than it declares.", entry=name)
        return data

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name, self.limits.max_json_bytes), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as exc:
            raise invalid(f"{name!r} in the {self.label} archive is not valid JSON: {exc}", entry=name) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys")
    return dict(pairs)


def _inspect_zip(handle: BinaryIO, limits: ContainerLimits) -> CheckpointInfo:
    handle.seek(0)
    archive = _Archive(handle, limits)
    names = set(archive.names())
    if "code/" in {n[:5] for n in names} or "constants.pkl" in names:
        _check_torchscript(archive)
        return CheckpointInfo("torchscript")
    if "archive_format" in names or any(n.startswith("models/") for n in names):
        _check_export(archive)
        return CheckpointInfo("export")
    if "data.pkl" in names:
        return CheckpointInfo("state_dict", tensors=_state_dict_tensors(archive))
    if "serialized_exported_program.json" in names:
        raise invalid("Legacy torch.export archives are refused; save the program again with torch.export.save.")
    raise invalid("The zip archive is not a TorchScript, torch.export or torch.save checkpoint.")


# ---------------------------------------------------------------------------- pickles of tensors


#: torch's typed storages (the classes its pickles name) -> (dtype, bytes per element).
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("float32", 4), "DoubleStorage": ("float64", 8), "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1), "ComplexFloatStorage": ("complex64", 8), "ComplexDoubleStorage": ("complex128", 16),
}
_RECORD_KEY = re.compile(r"^[A-Za-z0-9_]+$")
_LOCATION = re.compile(r"^(cpu|cuda|mps|xpu|meta)(:\d+)?$")
TRACED_INPUTS = "traced_inputs.pkl"  # read lazily by torch; its storages are written empty
_TORCHSCRIPT_LISTS = frozenset({"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"})


@dataclass(frozen=True)
class _Storage:
    dtype: str
    itemsize: int
    numel: int


class ScriptObject:
    """An instance of one of the archive's own TorchScript classes (``__torch__.*``)."""

    def __init__(self, cls: Global):
        self.cls = cls
        self.state: Any = None


class TensorPicklePolicy:
    """Tensors rebuilt from this archive's storage records, OrderedDicts and plain values.

    ``records`` gives the size of a record by name (None when absent) and ``record_dir``
    is where this pickle's storages live (``data`` for ``data.pkl``); ``script_classes``
    admits TorchScript's own classes and list builders.
    """

    def __init__(self, records: Callable[[str], int | None], record_dir: str | None, limits: ContainerLimits,
                 *, script_classes: bool = False, empty_records: bool = False):
        self.records = records
        self.record_dir = record_dir
        self.limits = limits
        self.script_classes = script_classes
        self.empty_records = empty_records  # torch.jit.trace keeps traced inputs' shapes with empty records

    def call(self, func: Global, args: tuple) -> Any:
        name = func.qualified
        if name == "collections.OrderedDict":
            return _ordered_dict(args)
        if name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return self._tensor(args)
        if name == "torch._utils._rebuild_parameter" and args and isinstance(args[0], TensorSpec):
            return args[0]
        if self.script_classes and func.module == "torch.jit._pickle":
            if func.name in _TORCHSCRIPT_LISTS and len(args) == 1 and isinstance(args[0], list):
                return args[0]
            if func.name == "restore_type_tag" and len(args) == 2 and isinstance(args[1], str):
                return args[0]
        raise PickleRefused(f"it calls {name}, which is not a tensor or container constructor")

    def new_object(self, cls: Global, args: tuple) -> Any:
        if self.script_classes and cls.module.split(".")[0] == "__torch__" and args == ():
            return ScriptObject(cls)
        raise PickleRefused(f"it creates an object of class {cls.qualified}")

    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, ScriptObject) and obj.state is None:
            obj.state = state
        elif not isinstance(obj, dict):  # an OrderedDict's _metadata: plain data, dropped
            raise PickleRefused(f"it sets the state of a {type(obj).__name__}")

    def persistent(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], Global)):
            raise PickleRefused("it references external data other than a tensor storage")
        _, cls, key, location, numel = pid
        if cls.module != "torch" or cls.name not in STORAGE_DTYPES:
            raise PickleRefused(f"it references a storage of type {cls.qualified}")
        if not isinstance(key, str) or not _RECORD_KEY.match(key) or not isinstance(location, str) or not _LOCATION.match(location):
            raise PickleRefused("it references a storage by an invalid name or device")
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel <= self.limits.max_tensor_elements:
            raise PickleRefused(f"a storage declares {numel!r} elements")
        dtype, itemsize = STORAGE_DTYPES[cls.name]
        size = None if self.record_dir is None else self.records(f"{self.record_dir}/{key}")
        if size is None:
            raise PickleRefused(f"storage {key!r} has no record in the archive")
        if size != numel * itemsize and not (size == 0 and self.empty_records):
            raise PickleRefused(f"storage {key!r} declares {numel} {dtype} elements but its record holds {size} bytes")
        return _Storage(dtype, itemsize, numel)

    def _tensor(self, args: tuple) -> TensorSpec:
        if len(args) < 4 or not isinstance(args[0], _Storage):
            raise PickleRefused("a tensor is rebuilt from something other than a storage")
        storage, offset, shape, stride = args[:4]
        check_tensor_layout(shape, stride, offset, storage.numel, self.limits)
        return TensorSpec(storage.dtype, tuple(shape))


def _ordered_dict(args: tuple) -> dict[Any, Any]:
    if args == ():
        return {}
    if len(args) == 1 and isinstance(args[0], list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in args[0]):
        try:
            return dict(args[0])
        except TypeError:
            raise PickleRefused("an OrderedDict has unhashable keys") from None
    raise PickleRefused("an OrderedDict is built from unexpected arguments")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_tensor_layout(shape: Any, stride: Any, offset: Any, storage_numel: int, limits: ContainerLimits) -> None:
    """Refuse a tensor whose shape, strides and offset do not fit its storage, before allocation."""
    if not isinstance(shape, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(shape) != len(stride):
        raise PickleRefused("a tensor declares a malformed shape or strides")
    if len(shape) > limits.max_dims or not all(_is_index(v) for v in (*shape, *stride, offset)):
        raise PickleRefused(f"a tensor declares shape {list(shape)[:8]} with strides {list(stride)[:8]}")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise PickleRefused(f"a tensor declares an absurd shape {list(shape)} ({numel} elements)")
    if numel and offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= storage_numel:
        raise PickleRefused(f"a tensor of shape {list(shape)} reaches past the end of its storage ({storage_numel} elements)")


def scan_pickle(archive: _Archive, name: str, *, script_classes: bool = False) -> Any:
    """Evaluate one pickle of the archive under the tensor policy; refusals name the pickle."""
    data = archive.read(name, archive.limits.max_pickle_bytes)
    record_dir = name[: -len(".pkl")] if name.endswith(".pkl") else None
    policy = TensorPicklePolicy(archive.record_size, record_dir, archive.limits, script_classes=script_classes,
                                empty_records=script_classes and name == TRACED_INPUTS)
    try:
        return evaluate_pickle(data, policy)
    except PickleRefused as exc:
        raise invalid(f"{name} in the {archive.label} archive was refused without being run: {exc}.", entry=name) from None


def _state_dict_tensors(archive: _Archive) -> dict[str, TensorSpec]:
    """A torch.save archive must describe a flat name -> tensor mapping (optionally under "state_dict")."""
    state = scan_pickle(archive, "data.pkl")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, TensorSpec) for k, v in state.items()
    ):
        raise invalid("The file is not a flat mapping of parameter names to tensors.")
    return state


# ---------------------------------------------------------------------------- TorchScript


def _check_torchscript(archive: _Archive) -> None:
    """Every pickle of the archive: the module tree, constants, traced inputs, debug tables."""
    pickles = [n for n in archive.names() if n.endswith(".pkl") or n.endswith(".debug_pkl")]
    if "data.pkl" not in pickles:
        raise invalid("The TorchScript archive has no data.pkl.")
    for name in pickles:
        scan_pickle(archive, name, script_classes=True)


# ---------------------------------------------------------------------------- torch.export (.pt2)


#: schema.ScalarType of torch 2.14's export serializer -> bytes per element.
EXPORT_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2,
                   29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}
_EXPORT_METADATA = frozenset({"archive_format", "archive_version", "byteorder", "version", ".data/version",
                              ".data/serialization_id", ".format_version", ".storage_alignment"})
_MODEL_JSON = re.compile(r"^models/(\w+)\.json$")
_PAYLOAD = {"weights": "weight_", "constants": "tensor_"}
_OPERATOR_TARGET = re.compile(r"^torch\.ops\.(aten|prims|higher_order)\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$")
#: The symbolic-shape operations torch's serializer writes as plain names (its _SYM_OPS).
SYM_OP_TARGETS = frozenset({
    *(f"_operator.{op}" for op in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv",
                                   "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift", "getitem")),
    "math.trunc",
    *(f"torch.{op}" for op in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")),
})
#: What sympy may parse: shape symbols, numbers, arithmetic, the functions torch registers for it and Symbol().
_SYMPY_NAMES = frozenset({
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Eq", "Ne",
    "Ge", "Gt", "Le", "Lt", "And", "Or", "Not", "True", "False", "oo", "zoo", "nan",
    "Symbol", "Integer", "Float", "Rational", "positive", "negative", "nonnegative", "integer", "real", "finite",
})
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_ +\-*/%().,<>=!&|~^]*$")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_SHAPE_SYMBOL = re.compile(r"^[a-z]{1,5}\d+$")  # s0, u3, zuf1 ...
_QUOTED_SYMBOL = re.compile(r"'([a-z]{1,5}\d+)'")
_GUARD_ACCESS = re.compile(r"L(\['\w+'\]|\[\d+\])+(\.(size|stride)\(\)\[\d+\]|\.storage_offset\(\))?")


def _check_export(archive: _Archive) -> None:
    """Refuse any .pt2 that torch.export.load would unpickle, dlopen or eval beyond plain tensors."""
    if archive.has("archive_format") and archive.read("archive_format", 64).strip() != b"pt2":
        raise invalid("The .pt2 archive declares another archive format.")
    models = {m.group(1) for m in map(_MODEL_JSON.match, archive.names()) if m}
    if not models:
        raise invalid("The .pt2 archive holds no exported program (models/*.json).")
    referenced: set[str] = set()
    for model in sorted(models):
        _check_program(archive, f"models/{model}.json")
        for kind in _PAYLOAD:
            referenced |= _check_payload_config(archive, model, kind)
        inputs = f"data/sample_inputs/{model}.pt"
        if archive.has(inputs):
            _check_sample_inputs(archive, inputs)
            referenced.add(inputs)
    for name in archive.names():
        if name in _EXPORT_METADATA or _MODEL_JSON.match(name) or name in referenced or name.startswith("extra/"):
            continue
        raise invalid(f"The .pt2 archive holds {name!r}, which torch may load as code or pickle; refused.", entry=name)


def _check_payload_config(archive: _Archive, model: str, kind: str) -> set[str]:
    """The weights or constants config of one program, and the payload records it references."""
    config_name = f"data/{kind}/{model}_{kind}_config.json"
    if not archive.has(config_name):
        return set()
    config = archive.read_json(config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise invalid(f"{config_name} in the .pt2 archive is malformed.", entry=config_name)
    referenced = {config_name}
    for fqn, meta in entries.items():
        record = _payload_record(archive, kind, fqn, meta)
        if meta.get("use_pickle") is True:
            _check_pickled_tensor(archive, record)
        else:
            _check_tensor_meta(archive, record, fqn, meta.get("tensor_meta"))
        referenced.add(record)
    return referenced


def _payload_record(archive: _Archive, kind: str, fqn: str, meta: Any) -> str:
    prefix = _PAYLOAD[kind]
    path_name = meta.get("path_name") if isinstance(meta, dict) else None
    if not isinstance(path_name, str) or not _RECORD_KEY.match(path_name):
        raise invalid(f"The .pt2 {kind} entry {fqn!r} names no valid payload file.", entry=fqn)
    if not path_name.startswith(prefix):
        what = "a custom or opaque object, loaded with pickle" if kind == "constants" else "a non-tensor payload"
        raise invalid(f"The .pt2 {kind} entry {fqn!r} is {what}; refused.", entry=fqn)
    record = f"data/{kind}/{path_name}"
    if not archive.has(record):
        raise invalid(f"The .pt2 {kind} entry {fqn!r} points at a missing record.", entry=fqn)
    return record


def _check_tensor_meta(archive: _Archive, record: str, fqn: str, meta: Any) -> None:
    """A raw tensor record: its declared layout must fit the bytes it has (torch allocates zeros for empty records)."""
    try:
        itemsize = EXPORT_ITEMSIZE[meta["dtype"]]
        shape = [s["as_int"] for s in meta["sizes"]]
        stride = [s["as_int"] for s in meta["strides"]]
        offset = meta["storage_offset"]["as_int"]
    except (KeyError, TypeError):
        raise invalid(f"The .pt2 tensor {fqn!r} has a malformed or symbolic description.", entry=fqn) from None
    nbytes = archive.record_size(record) or 0
    if nbytes % itemsize:
        raise invalid(f"The .pt2 tensor {fqn!r} has a record that is not a whole number of elements.", entry=fqn)
    try:
        check_tensor_layout(shape, stride, offset, nbytes // itemsize, archive.limits)
    except PickleRefused as exc:
        raise invalid(f"The .pt2 tensor {fqn!r} was refused: {exc}.", entry=fqn) from None


def _nested_archive(archive: _Archive, record: str) -> _Archive:
    data = archive.read(record, archive.limits.max_pickle_bytes)
    return _Archive(io.BytesIO(data), archive.limits, label=f"{record} (inside the .pt2)")


def _check_pickled_tensor(archive: _Archive, record: str) -> None:
    """``use_pickle`` payloads go to ``torch.load(weights_only=False)``: only one plain tensor may pass."""
    nested = _nested_archive(archive, record)
    if not isinstance(scan_pickle(nested, "data.pkl"), TensorSpec):
        raise invalid(f"{record} in the .pt2 archive pickles something other than one tensor.", entry=record)


def _check_sample_inputs(archive: _Archive, record: str) -> None:
    """Sample inputs are unpickled with a fallback to ``weights_only=False``: (args, kwargs) of tensors only."""
    value = scan_pickle(_nested_archive(archive, record), "data.pkl")
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
        raise invalid(f"{record} in the .pt2 archive is not a pair of sample args and kwargs.", entry=record)


def _check_program(archive: _Archive, name: str) -> None:
    """Graph calls only to registered torch operators; symbolic expressions and guards only arithmetic."""
    program = archive.read_json(name)
    guards = program.get("guards_code", []) if isinstance(program, dict) else []
    if not isinstance(guards, list) or not all(_safe_guard(g) for g in guards):
        raise invalid("The exported program carries guard code that is not a comparison of input sizes; refused.")
    for key, value in _json_items(program):
        if key == "target" and isinstance(value, str) and not _allowed_target(value):
            raise invalid(f"The exported program calls {value[:100]!r}, which is not a torch operator; refused.")
        if key == "expr_str" and not _safe_sympy_expression(value):
            raise invalid(f"The exported program holds a symbolic expression that is not arithmetic: {str(value)[:100]!r}.")


def _allowed_target(target: str) -> bool:
    return bool(_OPERATOR_TARGET.match(target)) or target in SYM_OP_TARGETS


def _safe_sympy_expression(expr: Any) -> bool:
    """Arithmetic on shape symbols, e.g. ``Symbol('s77', positive=True, integer=True)`` or ``2*s0 + 1``."""
    if not isinstance(expr, str) or len(expr) > 10_000:
        return False
    unquoted = _QUOTED_SYMBOL.sub(r" \1 ", expr)
    if not _EXPR_CHARS.match(unquoted) or "__" in unquoted:
        return False
    return all(w in _SYMPY_NAMES or _SHAPE_SYMBOL.match(w) for w in _IDENTIFIER.findall(_without_numbers(unquoted)))


def _safe_guard(guard: Any) -> bool:
    """``L['x'].size()[0] <= 512``: torch turns guards into Python source for ``.module()``."""
    if not isinstance(guard, str):
        return False
    return _safe_sympy_expression(_GUARD_ACCESS.sub(" s0 ", guard))


def _without_numbers(expr: str) -> str:
    """Drop numeric literals (1e-5, 3.0) so their exponents are not mistaken for names."""
    return re.sub(r"\b\d+(\.\d*)?([eE][+-]?\d+)?\b", " ", expr)


def _json_items(document: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of a JSON document, depth-first without recursion."""
    pending = [document]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                pending.append(value)
        elif isinstance(node, list):
            pending.extend(node)


# ---------------------------------------------------------------------------- safetensors


#: safetensors dtype names -> bytes per element.
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _inspect_safetensors(handle: BinaryIO, size: int, limits: ContainerLimits) -> CheckpointInfo:
    """The header must describe tensors that exactly tile the data after it."""
    handle.seek(0)
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > limits.max_safetensors_header:
        raise invalid(f"The safetensors header declares {header_len} bytes (limit {limits.max_safetensors_header}).")
    if 8 + header_len > size:
        raise invalid("The safetensors header runs past the end of the file.")
    try:
        header = json.loads(handle.read(header_len), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"The safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise invalid("The safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise invalid("The safetensors metadata must map names to strings.")
    if not header:
        raise invalid("The safetensors file holds no tensors.")
    tensors, spans = {}, []
    for name, entry in header.items():
        tensors[name], span = _safetensors_entry(name, entry, limits)
        spans.append(span)
    _check_tiling(sorted(spans), size - 8 - header_len)
    return CheckpointInfo("safetensors", tensors=tensors, metadata=dict(metadata))


def _safetensors_entry(name: str, entry: Any, limits: ContainerLimits) -> tuple[TensorSpec, tuple[int, int]]:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise invalid(f"The safetensors entry {name!r} is malformed.", entry=name) from None
    if dtype not in SAFETENSORS_ITEMSIZE:
        raise invalid(f"The safetensors entry {name!r} has unsupported dtype {str(dtype)[:20]!r}.", entry=name)
    if not isinstance(shape, list) or len(shape) > limits.max_dims or not all(_is_index(n) for n in (*shape, begin, end)):
        raise invalid(f"The safetensors entry {name!r} declares an invalid shape or byte range.", entry=name)
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise invalid(f"The safetensors entry {name!r} declares an absurd shape {shape}.", entry=name)
    if end < begin or end - begin != numel * SAFETENSORS_ITEMSIZE[dtype]:
        raise invalid(f"The safetensors entry {name!r}: shape {shape} of {dtype} does not match bytes {begin}..{end}.",
                      entry=name)
    return TensorSpec(dtype, tuple(shape)), (begin, end)


def _check_tiling(spans: list[tuple[int, int]], data_len: int) -> None:
    """Byte ranges may not overlap or point past the end of the file."""
    position = 0
    for begin, end in spans:
        if begin < position:
            raise invalid("Two safetensors entries overlap.")
        if end > data_len:
            raise invalid("A safetensors entry points past the end of the file.")
        position = end
