"""Helpers several test folders need: the CI rule for missing services, a small trained Fashion-MNIST
model and a private Redis database.

Kept as plain functions (not fixtures) so each test module wraps them in the scope it needs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch

from auditor.data import load_fashion_mnist, take
from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.training import TrainConfig, train_classifier

TINY_FMNIST_ARCH = ArchConfig("small_cnn", width=8)


def service_missing(message: str, hint: str = "run scripts/services.sh start") -> None:
    """Fail under CI (``CI=true``), skip elsewhere: CI must never pass by skipping what it could not reach."""
    text = f"{message} ({hint})" if hint else message
    if os.environ.get("CI") == "true":
        pytest.fail(text, pytrace=False)
    pytest.skip(text)
REDIS_DBS = range(5, 15)  # 15 belongs to test_api_jobs; sessions running side by side each claim a free one
REDIS_LOCK_KEY = "refine-audit:test-lock"


def train_tiny_fmnist_model(cache_dir: Path, out_dir: Path) -> tuple[torch.nn.Module, Path]:
    """A small CNN trained one epoch on 3,000 Fashion-MNIST images (about 75% accurate), saved as safetensors."""
    train, _ = load_fashion_mnist(cache_dir=cache_dir)
    subset = take(train, 3000, seed=0)
    torch.manual_seed(0)
    model = build_classifier(TINY_FMNIST_ARCH)
    train_classifier(model, subset.x, subset.y, TrainConfig(epochs=1, batch_size=64), device=torch.device("cpu"), seed=0)
    path = out_dir / "model.safetensors"
    save_classifier(model, TINY_FMNIST_ARCH, path)
    return model.eval(), path


@contextmanager
def claimed_redis_db(server_url: str, on_missing: Callable[[str], None]) -> Iterator[str]:
    """A Redis database of our own: claimed with a lock key, flushed before and after; yields its URL."""
    token = uuid.uuid4().hex
    for db in REDIS_DBS:
        client = redis.Redis.from_url(server_url, db=db, socket_connect_timeout=3)
        try:
            claimed = client.set(REDIS_LOCK_KEY, token, nx=True, ex=3600)
        except redis.RedisError as error:
            client.close()
            on_missing(f"Redis is not reachable at {server_url}: {error}")
            raise  # on_missing fails or skips; never fall through without a database
        if claimed:
            break
        client.close()
    else:
        pytest.fail(f"every Redis database in {list(REDIS_DBS)} is claimed by another test session")
    client.flushdb()
    client.set(REDIS_LOCK_KEY, token, ex=3600)
    try:
        yield f"{server_url.rstrip('/')}/{db}"
    finally:
        client.flushdb()  # drops the lock too
        client.close()
