"""A database call broken by Celery's soft time limit is told apart from an ordinary database hiccup."""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from shared_fixtures import database_call_broken_by
from sqlalchemy.exc import OperationalError

from worker.infra import interrupted_by_time_limit


def test_a_time_limit_inside_a_query_is_recognised_through_the_driver_failure():
    assert interrupted_by_time_limit(database_call_broken_by(SoftTimeLimitExceeded()))


@pytest.mark.parametrize("first", [ConnectionResetError("server closed the connection"), TimeoutError()])
def test_an_ordinary_database_hiccup_is_not_a_time_limit(first: BaseException):
    assert not interrupted_by_time_limit(database_call_broken_by(first))
    assert not interrupted_by_time_limit(OperationalError("UPDATE", {}, Exception("connection refused")))
