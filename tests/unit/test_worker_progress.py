"""A heartbeat write broken by Celery's soft time limit re-raises the limit instead of being skipped as a hiccup."""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from worker.infra import interrupted_by_time_limit, transient_error


def _driver_failure_during(first: BaseException) -> OperationalError:
    """What SQLAlchemy raises when the rollback after ``first`` fails on the half-sent command (CI's trace)."""
    try:
        try:
            raise first
        except BaseException:  # noqa: BLE001 -- the rollback runs whatever interrupted the query
            raise OperationalError("ROLLBACK", {}, Exception("another command is already in progress"))
    except OperationalError as failure:
        return failure


def test_a_time_limit_inside_a_query_is_recognised_through_the_driver_failure():
    assert interrupted_by_time_limit(_driver_failure_during(SoftTimeLimitExceeded()))


@pytest.mark.parametrize("first", [ConnectionResetError("server closed the connection"), TimeoutError()])
def test_an_ordinary_database_hiccup_is_not_a_time_limit(first: BaseException):
    assert not interrupted_by_time_limit(_driver_failure_during(first))
    assert not interrupted_by_time_limit(OperationalError("UPDATE", {}, Exception("connection refused")))
