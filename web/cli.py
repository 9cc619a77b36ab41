"""``refine-audit serve``, ``user create`` and ``token create|list|revoke``.

``register(group)`` adds them to the main ``refine-audit`` group (``auditor/cli.py``
calls it). Importing this module loads neither Flask nor torch (``serve`` imports the
app when it runs), so ``auditor/cli.py`` can import it at the top. ``serve`` is the embedded
composition root: without a broker it runs audits in this process, which is the one
place allowed to import both ``web`` and ``worker``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

import click
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from auditor.sandbox import SandboxUnavailable
from auditor.logs import configure_logging
from auditor.settings import Settings, SettingsError
from auditor.store import users
from auditor.store.artifacts import ArtifactStore, store_from_url
from auditor.store.db import make_engine, make_session_factory, session_scope, upgrade_database
from auditor.store.lifecycle import AuditStatus
from auditor.store.models import Audit, User
from web.jobs import CeleryQueue, InProcessQueue, JobQueue

if TYPE_CHECKING:
    from worker.sweep import Sweeper


def register(group: click.Group) -> None:
    """Attach the web commands to ``group`` (the ``refine-audit`` CLI)."""
    for command in (serve, user, token, db):
        group.add_command(command)


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def database(settings: Settings) -> Iterator[Session]:
    """A committed-on-success session on a migrated database (first runs need no setup step)."""
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


# --- serve ----------------------------------------------------------------------------------


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the REST API on this machine.

    Without REFINE_AUDIT_BROKER_URL, audits run one at a time inside this process (SQLite
    and a local folder by default). With a broker, they go to Celery workers. For
    production behind gunicorn, use the WSGI app `web.wsgi:app` instead.
    """
    from werkzeug.serving import make_server

    from web import create_app

    settings = load_settings()
    configure_logging(settings.log_format)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    store = store_from_url(settings.artifacts_url, settings)
    try:
        queue = build_queue(settings, store)
        app = create_app(settings, store=store, queue=queue, engine=engine)
    except SandboxUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    in_process = isinstance(queue, InProcessQueue)
    if in_process:
        requeue_unfinished(make_session_factory(engine), queue)
    sweeper = webhook_sweeper(settings, engine, store) if in_process else None
    mode = "Celery broker" if settings.broker_url else "in-process audits"
    click.echo(f"refine-audit API on http://{host}:{port}/api/v1 ({mode}; docs at /api/v1/docs)", err=True)
    server = make_server(host, port, app, threaded=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if sweeper is not None:
            sweeper.stop()


def build_queue(settings: Settings, store: ArtifactStore) -> JobQueue:
    """Celery with a broker; otherwise the worker's executor on a background thread,
    sharing the web app's artifact store."""
    if settings.broker_url is not None:
        return CeleryQueue(settings.broker_url)
    from auditor.sandbox import audit_runner  # imports the pipeline (torch): only when audits run here

    runner = audit_runner(settings, lambda message: click.secho(message, fg="yellow", err=True))

    def run(audit_id: str) -> None:
        from worker.executor import execute_audit  # lazy: only the in-process mode runs audits here

        execute_audit(audit_id, settings, store=store, runner=runner)

    return InProcessQueue(run)


def webhook_sweeper(settings: Settings, engine: Engine, store: ArtifactStore) -> Sweeper:
    """The in-process mode's share of the workers' sweep: retrying owed webhooks (its audits
    never leave this process, so there is nothing to recover or re-publish)."""
    from worker.sweep import Sweep, Sweeper, SweepLock  # lazy, like the executor

    sweep = Sweep(settings, make_session_factory(engine), lambda: store)
    return Sweeper(sweep, SweepLock(engine), settings.sweep_interval_s).start()


def requeue_unfinished(sessions: sessionmaker[Session], queue: JobQueue) -> list[str]:
    """Audits a previous in-process server left queued or running would otherwise wait
    forever: nothing else will ever pick them up. Oldest first."""
    unfinished = (AuditStatus.QUEUED, AuditStatus.RUNNING)
    with session_scope(sessions) as session:
        query = select(Audit.id, Audit.queue).where(Audit.status.in_(unfinished)).order_by(Audit.created_at)
        pending = list(session.execute(query))
    for audit_id, name in pending:
        queue.enqueue(audit_id, name)
    return [audit_id for audit_id, _ in pending]


# --- users and tokens -----------------------------------------------------------------------


@click.group()
def user() -> None:
    """Manage user accounts."""


@user.command("create")
@click.option("--email", required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True, help="Prompted when omitted.")
@click.option("--admin", is_flag=True, help="Give the user operator rights.")
def create_user(email: str, password: str, admin: bool) -> None:
    """Create a user who can sign in and own API tokens."""
    if len(password) < 8:
        raise click.BadParameter("use at least 8 characters", param_hint="--password")
    settings = load_settings()
    try:
        with database(settings) as session:
            created = users.create_user(session, email, password, is_admin=admin)
            email = created.email
    except users.EmailTaken as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created user {email}", err=True)


@click.group()
def token() -> None:
    """Manage API tokens (``Authorization: Bearer ra_...``)."""


@token.command("create")
@click.option("--email", required=True, help="The owner of the token.")
@click.option("--name", default="cli", show_default=True, help="A label to tell tokens apart.")
@click.option("--json", "as_json", is_flag=True, help='Print {"token", "webhook_secret"} as JSON on stdout.')
def create_token(email: str, name: str, as_json: bool) -> None:
    """Create a token and print it and its webhook signing secret, once.

    The token goes alone on stdout (so scripts can capture it) and the secret to
    stderr; with --json both go to stdout as one JSON object.
    """
    with database(load_settings()) as session:
        owner = _user_or_fail(session, email)
        created, plaintext = users.create_token(session, owner.id, name)
        secret = created.webhook_secret
    if as_json:
        click.echo(json.dumps({"token": plaintext, "webhook_secret": secret}))
        return
    click.echo("store the token and its webhook secret now; neither can be shown again:", err=True)
    click.echo(f"webhook signing secret (verifies the callbacks of audits this token submits): {secret}", err=True)
    click.echo(plaintext)


@token.command("list")
@click.option("--email", required=True)
def list_tokens(email: str) -> None:
    """List a user's tokens (prefixes only)."""
    with database(load_settings()) as session:
        tokens = users.list_tokens(session, _user_or_fail(session, email).id)
    click.echo(f"{'id':>5}  {'name':<20} {'prefix':<12} {'created':<20} {'last used':<20} revoked")
    for t in tokens:
        click.echo(
            f"{t.id:>5}  {t.name:<20} {t.prefix:<12} {_when(t.created_at):<20} {_when(t.last_used_at):<20} "
            f"{_when(t.revoked_at) if t.revoked_at else 'no'}"
        )


@token.command("revoke")
@click.option("--email", required=True)
@click.argument("token_id", type=int)
def revoke_token(email: str, token_id: int) -> None:
    """Revoke one of a user's tokens by id (see `token list`)."""
    with database(load_settings()) as session:
        if not users.revoke_token(session, token_id, _user_or_fail(session, email).id):
            raise click.ClickException(f"{email} has no token {token_id}")
    click.echo(f"revoked token {token_id}", err=True)


def _user_or_fail(session: Session, email: str) -> User:
    found = users.get_user_by_email(session, email)
    if found is None:
        raise click.ClickException(f"no user {email}; create one with `refine-audit user create --email {email}`")
    return found


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


# --- database -------------------------------------------------------------------------------


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def upgrade() -> None:
    """Migrate the database to the newest schema (run before starting gunicorn and workers)."""
    settings = load_settings()
    upgrade_database(settings.database_url)
    click.echo("database is at the newest schema", err=True)
