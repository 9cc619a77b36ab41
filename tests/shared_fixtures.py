"""Helpers several test folders need: the CI rule for missing services, a small trained
Fashion-MNIST model, a private Redis database, a fresh PostgreSQL database, and the
database failure a signal leaves behind.

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
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from auditor.attacks import Attack, AttackConfig, train_backdoored_model
from auditor.data import load_fashion_mnist, take
from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.store.db import make_engine
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


def train_tiny_backdoored_fmnist_model(cache_dir: Path, out_dir: Path) -> tuple[torch.nn.Module, Path, Attack]:
    """A small CNN with a working BadNets backdoor (target 0), trained 4 epochs on 4,000 images, saved as safetensors."""
    train, test = load_fashion_mnist(cache_dir=cache_dir)
    bd = train_backdoored_model(TINY_FMNIST_ARCH, take(train, 4000, seed=0), take(test, 300, seed=0),
                                AttackConfig("badnets", target=0, seed=0, poison_rate=0.1),
                                TrainConfig(epochs=4, batch_size=32), device=torch.device("cpu"), seed=0)
    path = out_dir / "model.safetensors"
    save_classifier(bd.model, TINY_FMNIST_ARCH, path)
    return bd.model.eval(), path, bd.attack


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


PG_ADMIN_URL = os.environ.get("REFINE_AUDIT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextmanager
def throwaway_database(
    prefix: str, on_missing: Callable[[str], None] | None = None, server_url: str = PG_ADMIN_URL
) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database on ``server_url``'s server, dropped afterwards
    even while a process still holds connections to it. An unreachable server goes to
    ``on_missing`` (fail under CI, skip elsewhere) or, without one, raises."""
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        admin.dispose()
        if on_missing is not None:
            on_missing(f"PostgreSQL is not reachable at {server_url}: {error.orig}")
        raise
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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


def database_call_broken_by(first: BaseException) -> OperationalError:
    """What SQLAlchemy raises when the rollback after ``first`` fails on the half-sent command (CI's trace of
    Celery's soft time limit landing inside a query: the limit is only in the context)."""
    try:
        try:
            raise first
        except BaseException:  # noqa: BLE001 -- the rollback runs whatever interrupted the query
            raise OperationalError("ROLLBACK", {}, Exception("another command is already in progress"))
    except OperationalError as failure:
        return failure
