"""In-memory image sets, the built-in Fashion-MNIST, user uploads and deterministic splits.

Images are kept as uint8 tensors (N, C, H, W): 70,000 Fashion-MNIST images are
55 MB, so every stage works on tensors in memory and batches by slicing,
without DataLoader workers (which cost more than they save on 2 cores).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from auditor.archives import expands_too_much, unsafe_entry_reason
from auditor.errors import AuditError, ErrorCode
from auditor.settings import DEFAULT_FMNIST_DIR
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Limits:
    """Caps on uploaded data; uploads are untrusted and decompress in memory."""

    max_bytes: int = 512 * 1024 * 1024
    max_images: int = 200_000
    max_side: int = 256
    min_images: int = 20


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) and optional int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError("ImageSet.x must be uint8 (N, C, H, W)")
        if self.y is not None and self.y.shape != (len(self.x),):
            raise ValueError("ImageSet.y must have one label per image")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int | None:
        if self.class_names:
            return len(self.class_names)
        return int(self.y.max()) + 1 if self.y is not None else None

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.x[index], None if self.y is None else self.y[index], self.class_names)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Float [0, 1] batches in order, the last one partial: evaluation never drops images."""
        for start in range(0, len(self), batch_size):
            xb = self.x[start : start + batch_size].float().div_(255)
            yb = None if self.y is None else self.y[start : start + batch_size]
            yield xb, yb


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats back to the uint8 storage format, rounding rather than truncating."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def _read_idx(path: Path, cache: Path) -> torch.Tensor:
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    return read_sn3_pascalvincent_tensor(str(_unpacked(path, cache)), strict=False)


def _unpacked(path: Path, cache: Path) -> Path:
    """The plain IDX file for ``path``, unpacked into ``cache`` once when it is gzipped."""
    if path.suffix != ".gz":
        return path
    plain = cache / path.stem
    if not plain.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # A private temporary name: workers starting together each unpack
        # their own copy, and the atomic rename lets any of them win.
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f"{plain.name}.", suffix=".part")
        try:
            with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(tmp, 0o644)  # public data; sandboxed audits read it as another user
            os.replace(tmp, plain)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    elif not plain.stat().st_mode & 0o004 and plain.stat().st_uid == os.geteuid():
        os.chmod(plain, 0o644)  # unpacked private by an older version
    return plain


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz", root / "raw" / stem, root / "raw" / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise AuditError(
        ErrorCode.DATASET_NOT_FOUND,
        f"Fashion-MNIST file {stem} not found under {root}. Install the Debian package "
        "dataset-fashion-mnist or set REFINE_AUDIT_FMNIST_DIR.",
    )


def fashion_mnist_dirs(root: str | Path = DEFAULT_FMNIST_DIR, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Where the packaged IDX files are (``Settings.fmnist_dir``), and where their unpacked
    copies are cached (under ``cache_dir``, ``Settings.data_dir``; by default ``~/.cache/refine-audit``)."""
    return Path(root), Path(cache_dir or Path.home() / ".cache" / "refine-audit") / "fmnist"


def unpack_fashion_mnist(root: str | Path = DEFAULT_FMNIST_DIR, cache_dir: str | Path | None = None) -> Path:
    """Unpack the packaged files into the cache (once), so each audit need not; returns the cache folder."""
    root, cache = fashion_mnist_dirs(root, cache_dir)
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            _unpacked(_find(root, f"{prefix}-{kind}-ubyte"), cache)
    return cache


def fashion_mnist_files(root: str | Path = DEFAULT_FMNIST_DIR) -> list[Path]:
    """The four packaged files (what the built-in data set's digest is computed over)."""
    return [_find(Path(root), f"{prefix}-{kind}-ubyte") for prefix in ("train", "t10k")
            for kind in ("images-idx3", "labels-idx1")]


def load_fashion_mnist(root: str | Path = DEFAULT_FMNIST_DIR, cache_dir: str | Path | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the IDX files of the Debian package; nothing is downloaded."""
    root, cache = fashion_mnist_dirs(root, cache_dir)
    sets = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), cache)
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), cache)
        sets.append(ImageSet(images.unsqueeze(1).contiguous(), labels.long(), FMNIST_CLASSES))
    return sets[0], sets[1]


def _bad(message: str, code: ErrorCode = ErrorCode.INVALID_DATASET, **detail: object) -> AuditError:
    return AuditError(code, message, dict(detail))


def _check_images_array(x: np.ndarray, limits: Limits) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise _bad(f"x must be uint8, got {x.dtype}.", field="x")
    if x.ndim == 3:
        x = x[:, :, :, None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise _bad("x must have shape N x H x W or N x H x W x C with C = 1 or 3.", shape=list(x.shape))
    n, h, w, _ = x.shape
    if n < limits.min_images:
        raise _bad(f"The dataset has {n} images; at least {limits.min_images} are needed.", count=n)
    if n > limits.max_images:
        raise _bad(f"The dataset has {n} images; the limit is {limits.max_images}.", ErrorCode.DATASET_TOO_LARGE)
    if max(h, w) > limits.max_side or min(h, w) < 8:
        raise _bad(f"Images must be between 8 and {limits.max_side} pixels per side.", height=h, width=w)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _check_labels(y: np.ndarray, n: int) -> torch.Tensor:
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise _bad("y must be an integer vector with one label per image.", field="y")
    if y.min() < 0 or y.max() > 999:
        raise _bad("Labels must be in 0..999.", field="y")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str | Path, limits: Limits = Limits()) -> ImageSet:
    """``x`` uint8 N x H x W[ x C], optional ``y``; arrays are read without pickle."""
    path = Path(path)
    if path.stat().st_size > limits.max_bytes:
        raise _bad("The dataset file is too large.", ErrorCode.DATASET_TOO_LARGE, size=path.stat().st_size)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise _bad("The .npz file needs an array named x.", field="x")
            declared = sum(info.file_size for info in zipfile.ZipFile(path).infolist())
            if declared > limits.max_bytes:
                raise _bad("The dataset expands past the size limit.", ErrorCode.DATASET_TOO_LARGE)
            x = _check_images_array(archive["x"], limits)
            y = _check_labels(archive["y"], len(x)) if "y" in archive.files else None
    except AuditError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _bad(f"The .npz file could not be read: {exc}") from exc
    return ImageSet(x, y)


def load_image_zip(path: str | Path, limits: Limits = Limits()) -> ImageSet:
    """A zip of ``class_name/image.png`` folders; classes are numbered in sorted order."""
    path = Path(path)
    if path.stat().st_size > limits.max_bytes:
        raise _bad("The archive is too large.", ErrorCode.DATASET_TOO_LARGE, size=path.stat().st_size)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise _bad("The file is not a zip archive.") from exc
    with archive:
        entries = _checked_entries(archive, limits)
        classes = sorted({p.parts[-2] for _, p in entries})
        if len(classes) < 2:
            raise _bad("The archive needs at least two class folders.", classes=classes)
        images, labels = [], []
        for info, p in entries:
            images.append(_decode_image(archive.read(info), p, limits))
            labels.append(classes.index(p.parts[-2]))
    shapes = {img.shape for img in images}
    if len(shapes) != 1:
        raise _bad("All images must have the same size and number of channels.", shapes=[list(s) for s in shapes][:5])
    x = _check_images_array(np.stack(images), limits)
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), tuple(classes))


def _checked_entries(archive: zipfile.ZipFile, limits: Limits) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    entries, total = [], 0
    for info in archive.infolist():
        reason = unsafe_entry_reason(info)
        if reason is not None:
            raise _bad(f"The archive entry {info.filename!r} {reason}.", ErrorCode.UNSAFE_ARCHIVE, entry=info.filename)
        path = PurePosixPath(info.filename)
        if info.is_dir() or path.name.startswith(".") or "__MACOSX" in path.parts:
            continue
        total += info.file_size
        if total > limits.max_bytes or expands_too_much(info):
            raise _bad("The archive expands too much (a decompression bomb?).", ErrorCode.UNSAFE_ARCHIVE)
        if len(path.parts) < 2:
            raise _bad(f"{info.filename!r} is not inside a class folder.", entry=info.filename)
        entries.append((info, path))
        if len(entries) > limits.max_images:
            raise _bad("The archive holds too many images.", ErrorCode.DATASET_TOO_LARGE)
    return entries


def _decode_image(raw: bytes, path: PurePosixPath, limits: Limits) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if max(img.size) > limits.max_side:
                raise _bad(f"{path} is larger than {limits.max_side} pixels.", entry=str(path))
            img = img.convert("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except AuditError:
        raise
    except Exception as exc:
        raise _bad(f"{path} is not a readable image.", entry=str(path)) from exc
    return arr if arr.ndim == 3 else arr[:, :, None]


def load_dataset(path: str | Path, limits: Limits = Limits()) -> ImageSet:
    """Dispatch on the file's bytes: npz archives hold .npy members, image zips hold images."""
    path = Path(path)
    if not path.is_file():
        raise _bad(f"Dataset file {path.name!r} does not exist.", ErrorCode.DATASET_NOT_FOUND)
    if not zipfile.is_zipfile(path):
        raise _bad("A dataset must be an .npz file or a zip of class folders.")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if names and all(n.endswith(".npy") for n in names):
        return load_npz(path, limits)
    return load_image_zip(path, limits)


@dataclass
class Split:
    """The unlabeled pool REFINE trains on and the labeled test set it is judged on."""

    pool: ImageSet
    test: ImageSet


def split_pool_test(data: ImageSet, test_fraction: float, seed: int) -> Split:
    """Deterministic shuffle then cut; the pool's labels are dropped so nothing can use them."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(data) * test_fraction)))
    test = data.subset(order[:n_test])
    pool = data.subset(order[n_test:])
    return Split(pool=ImageSet(pool.x, None, data.class_names), test=test)


def take(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A seeded random subset of at most n images (all of them when n is None)."""
    if n is None or n >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.subset(order.sort().values)
