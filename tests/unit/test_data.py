import io
import multiprocessing
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from auditor.data import Limits, load_dataset, load_fashion_mnist, split_pool_test
from auditor.errors import AuditError


def _code(exc_info) -> str:
    return exc_info.value.code.value


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_fashion_mnist_is_read_from_the_debian_package(tmp_path):
    train, test = load_fashion_mnist(cache_dir=tmp_path)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y.bincount().tolist() == [6000] * 10
    assert train.class_names[0] == "T-shirt/top"


def test_workers_starting_together_unpack_the_dataset_without_tripping_on_each_other(tmp_path):
    # Two benchmark processes launched at once used to share one ".part" file,
    # and the slower one's rename failed with FileNotFoundError.
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        sizes = pool.map(_train_size, [tmp_path] * 3)
    assert sizes == [60000] * 3
    assert sorted(p.name for p in (tmp_path / "fmnist").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    ]


def _train_size(cache_dir) -> int:
    return len(load_fashion_mnist(cache_dir=cache_dir)[0])


def test_npz_with_labels_loads_as_nchw(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((30, 10, 10, 3), dtype=np.uint8), y=np.arange(30) % 3)
    data = load_dataset(path)
    assert data.x.shape == (30, 3, 10, 10)
    assert data.num_classes == 3


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((30, 10, 10), dtype=np.float32), "uint8"),
        (np.zeros((30, 10), dtype=np.uint8), "shape"),
        (np.zeros((5, 10, 10), dtype=np.uint8), "at least"),
    ],
)
def test_npz_with_bad_arrays_is_refused_with_a_clear_message(tmp_path, x, message):
    path = tmp_path / "d.npz"
    np.savez(path, x=x)
    with pytest.raises(AuditError, match=message) as info:
        load_dataset(path)
    assert _code(info) == "invalid_dataset"


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([object()] * 30, dtype=object))
    with pytest.raises(AuditError) as info:
        load_dataset(path)
    assert _code(info) == "invalid_dataset"


def test_image_zip_of_class_folders_loads(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for k, cls in enumerate(["cat", "dog"]):
            for i in range(12):
                archive.writestr(f"{cls}/{i}.png", _png(40 * k + i))
    data = load_dataset(path)
    assert data.x.shape == (24, 1, 12, 12)
    assert data.class_names == ("cat", "dog")
    assert data.y.tolist().count(1) == 12


def test_zip_with_path_traversal_is_refused(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat/1.png", _png(1))
        archive.writestr("../../etc/evil.png", _png(2))
    with pytest.raises(AuditError) as info:
        load_dataset(path)
    assert _code(info) == "unsafe_archive"


def test_zip_bomb_is_refused_before_decompressing(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cat/big.png", b"\0" * (50 * 1024 * 1024))
    with pytest.raises(AuditError) as info:
        load_dataset(path, Limits(max_bytes=10 * 1024 * 1024))
    assert _code(info) == "unsafe_archive"


def test_split_is_deterministic_and_drops_pool_labels():
    from auditor.data import ImageSet

    data = ImageSet(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 8, 8).contiguous(), torch.arange(100) % 2)
    a, b = split_pool_test(data, 0.2, seed=4), split_pool_test(data, 0.2, seed=4)
    assert torch.equal(a.test.x, b.test.x)
    assert len(a.test) == 20 and len(a.pool) == 80 and a.pool.y is None
    assert not set(a.test.x[:, 0, 0, 0].tolist()) & set(a.pool.x[:, 0, 0, 0].tolist())
