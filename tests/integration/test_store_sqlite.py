"""The embedded SQLite file shared by the web process, the CLI and an in-process worker."""

from __future__ import annotations

import threading

from auditor.store import users
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database


def test_a_read_then_write_transaction_waits_for_a_concurrent_writer_instead_of_failing(sqlite_url: str) -> None:
    """``user create`` reads the users table, hashes the password, then inserts. A commit by
    another process in between once made that insert fail with "database is locked" (a
    CI run of the portal tests, where the in-process audit was recording its progress)."""
    upgrade_database(sqlite_url)
    cli, worker = (make_session_factory(make_engine(sqlite_url)) for _ in range(2))
    worker_committed = threading.Event()

    def write_from_the_worker() -> None:
        with session_scope(worker) as session:
            users.create_user(session, "worker@example.com", "pw")
        worker_committed.set()

    with session_scope(cli) as session:
        assert users.get_user_by_email(session, "cli@example.com") is None  # the read comes first
        other = threading.Thread(target=write_from_the_worker)
        other.start()
        worker_committed.wait(timeout=2)  # a deferred BEGIN lets the worker commit here
        users.create_user(session, "cli@example.com", "pw")
    other.join(timeout=30)

    assert worker_committed.is_set(), "the other writer waited its turn and then committed"
    with session_scope(cli) as session:
        assert users.get_user_by_email(session, "cli@example.com") is not None
        assert users.get_user_by_email(session, "worker@example.com") is not None
