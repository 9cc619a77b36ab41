"""Datasets: built-in Fashion-MNIST, validated uploads, deterministic splits."""

from auditor.data.datasets import (
    FMNIST_CLASSES,
    ImageSet,
    Limits,
    Split,
    load_dataset,
    load_fashion_mnist,
    load_image_zip,
    load_npz,
    split_pool_test,
    take,
    to_uint8,
)

__all__ = [
    "FMNIST_CLASSES",
    "ImageSet",
    "Limits",
    "Split",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_zip",
    "load_npz",
    "split_pool_test",
    "take",
    "to_uint8",
]
