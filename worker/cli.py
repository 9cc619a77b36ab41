"""``refine-audit worker``: start a Celery worker for audits.

The lead registers it in ``auditor/cli.py`` with ``register(main)``; importing this
module does not build the Celery app (that needs a broker URL), the command does.
"""

from __future__ import annotations

import click

DEFAULT_QUEUES = "cpu,gpu"


def worker_argv(queues: str, concurrency: int, beat: bool, loglevel: str, schedule_file: str) -> list[str]:
    """The ``celery worker`` arguments for these options (separate, so tests can check them)."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    argv = ["worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
    argv += ["--prefetch-multiplier=1", "--without-gossip", "--without-mingle"]
    if beat:
        argv += ["--beat", f"--schedule={schedule_file}"]
    return argv


@click.command("worker")
@click.option("--queues", "-Q", default=DEFAULT_QUEUES, show_default=True, help="Comma list: cpu, gpu.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Audits at once; one per GPU.")
@click.option("--beat", is_flag=True, help="Also run the scheduler of the stale-audit reaper (one per deployment).")
@click.option("--loglevel", "-l", default="info", show_default=True)
def worker_command(queues: str, concurrency: int, beat: bool, loglevel: str) -> None:
    """Run queued audits from the broker in REFINE_AUDIT_BROKER_URL."""
    from worker.celery_app import SETTINGS, app, QUEUES

    unknown = sorted({q.strip() for q in queues.split(",") if q.strip()} - set(QUEUES))
    if unknown:
        raise click.BadParameter(f"unknown queues {unknown}; known: {', '.join(QUEUES)}", param_hint="--queues")
    SETTINGS.data_dir.mkdir(parents=True, exist_ok=True)
    schedule = str(SETTINGS.data_dir / "celerybeat-schedule")
    app.worker_main(argv=worker_argv(queues, concurrency, beat, loglevel, schedule))


def register(group: click.Group) -> None:
    """Add ``worker`` to the ``refine-audit`` command group."""
    group.add_command(worker_command)


if __name__ == "__main__":
    worker_command()
