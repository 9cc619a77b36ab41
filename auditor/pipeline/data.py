"""Stage ``data``: read the images, resolve the plan, and cut the pool and test sets it asks for.

Data comes first because bare weights take their input shape and class count
from it, and because an uploaded data set's size is only known once it is read.
Planning needs nothing else, so the plan is resolved here, before any model is
loaded or trained; every later stage reads its numbers from ``state.plan``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from auditor.data import ImageSet, Limits, load_dataset, load_fashion_mnist, take
from auditor.errors import AuditError, ErrorCode
from auditor.models.checkpoints import sha256_file
from auditor.pipeline.plan import FASHION_MNIST, DataSummary, plan_audit, test_split_size, upload_summary
from auditor.pipeline.state import AuditState

if TYPE_CHECKING:
    from auditor.spec import AuditSpec


def stage_data(state: AuditState) -> None:
    spec = state.spec
    if spec.data.source == "fashion-mnist":
        pool, test = load_fashion_mnist(state.inputs.fmnist_dir, state.inputs.cache_dir)
        summary, digest = FASHION_MNIST, None
    else:
        if state.inputs.dataset_path is None:
            raise AuditError(ErrorCode.INVALID_DATASET, "data.source is 'upload' but no dataset file was given.")
        data = load_dataset(state.inputs.dataset_path, Limits())
        pool, test = split_upload(data, spec.data.test_fraction, spec.seed)
        summary, digest = summarize_upload(data, spec.data.test_fraction), sha256_file(state.inputs.dataset_path)
    state.plan = plan = plan_audit(spec, summary, device=state.device)
    state.labelled = summary.labelled
    state.pool = take(pool, plan.data.pool_images, spec.seed)
    test_take = stratified_take if plan.data.stratified else take
    state.test = test_take(test, plan.data.test_images, spec.seed + 1)
    k = plan.data.num_classes
    names = list(state.test.class_names or state.pool.class_names or [str(c) for c in range(k)])
    state.data_info = {
        "source": "fashion_mnist" if summary is FASHION_MNIST else "upload", "sha256": digest,
        "pool_size": len(state.pool), "test_size": len(state.test), "image_shape": list(state.test.shape),
        "num_classes": k, "class_names": names,
    }


def summarize_upload(data: ImageSet, test_fraction: float) -> DataSummary:
    """The plan's view of an uploaded data set: its size, image shape and classes (the web's upload check uses it)."""
    return upload_summary(len(data), data.shape, data.num_classes, data.y is not None, test_fraction)


def split_upload(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Keep labels on both sides: REFINE ignores them, positive controls train on them."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = test_split_size(len(data), test_fraction)
    return data.subset(order[n_test:]), data.subset(order[:n_test])


def stratified_take(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A seeded subset of ``n`` images keeping each class's share (a random one without labels).

    The API evaluation subsample uses it, so BA on the subsample estimates BA on the
    whole test split without a class being over- or under-represented by chance.
    """
    if data.y is None or n >= len(data):
        return take(data, n, seed)
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(data.y, return_counts=True)
    quotas = _largest_remainder(counts.tolist(), n)
    picked = []
    for cls, quota in zip(classes.tolist(), quotas):
        members = torch.nonzero(data.y == cls).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:quota]])
    return data.subset(torch.cat(picked).sort().values)


def _largest_remainder(counts: list[int], n: int) -> list[int]:
    """Integer quotas proportional to ``counts`` that add up to exactly ``n``."""
    total = sum(counts)
    exact = [c * n / total for c in counts]
    quotas = [int(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: exact[i] - quotas[i], reverse=True)
    for i in by_remainder[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


def data_summary(spec: AuditSpec, dataset_path: Path | None, limits: Limits = Limits()) -> DataSummary:
    """The plan's view of the data an audit will read: Fashion-MNIST's known sizes, or the uploaded file's.

    Reading an upload decodes it (the same check the web app runs on arrival); the
    built-in data set is never read.
    """
    if spec.data.source == "fashion-mnist":
        return FASHION_MNIST
    if dataset_path is None:
        raise AuditError(ErrorCode.INVALID_DATASET, "data.source is 'upload' but no dataset file was given.")
    return summarize_upload(load_dataset(dataset_path, limits), spec.data.test_fraction)
