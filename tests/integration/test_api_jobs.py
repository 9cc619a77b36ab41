"""The job queue adapters: Celery messages by task name on the real Redis, and the
in-process runner that executes audits one at a time."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid

import pytest
import redis

from web.jobs import RUN_AUDIT_TASK, CeleryQueue, InProcessQueue

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as error:
        message = f"Redis is not reachable at {REDIS_URL}: {error} (run scripts/services.sh start)"
        if os.environ.get("CI") == "true":  # as in tests/conftest.py: CI must not skip
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return client


def test_celery_queue_publishes_the_task_by_name_on_the_chosen_queue(redis_client: redis.Redis) -> None:
    queue_name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        CeleryQueue(REDIS_URL).enqueue("audit-123", queue_name)

        raw = redis_client.lpop(queue_name)
    finally:
        redis_client.delete(queue_name)
    message = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert message["headers"]["task"] == RUN_AUDIT_TASK
    assert args == ["audit-123"]


def test_in_process_queue_runs_audits_in_order_one_at_a_time() -> None:
    ran, running, overlap = [], [0], []
    lock = threading.Lock()

    def run(audit_id: str) -> None:
        with lock:
            running[0] += 1
            overlap.append(running[0])
        time.sleep(0.02)
        ran.append(audit_id)
        with lock:
            running[0] -= 1
        if audit_id == "b":
            raise RuntimeError("a crashing audit must not stop the runner")

    queue = InProcessQueue(run)
    for audit_id in ("a", "b", "c"):
        queue.enqueue(audit_id, "cpu")
    queue.wait_idle()
    queue.close()

    assert ran == ["a", "b", "c"]
    assert max(overlap) == 1
