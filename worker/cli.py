"""``refine-audit worker``: start a Celery worker for audits.

The lead registers it in ``auditor/cli.py`` with ``register(main)``; importing this
module does not build the Celery app (that needs a broker URL), the command does.
Every worker also takes its turn at the sweep that recovers lost audits
(``worker.sweep``), so this one command is all a deployment runs.
"""

from __future__ import annotations

import click

DEFAULT_QUEUES = "cpu,gpu"


def worker_argv(queues: str, concurrency: int, loglevel: str) -> list[str]:
    """The ``celery worker`` arguments for these options (separate, so tests can check them)."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    argv = ["worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
    return argv + ["--prefetch-multiplier=1", "--without-gossip", "--without-mingle"]


@click.command("worker")
@click.option("--queues", "-Q", default=DEFAULT_QUEUES, show_default=True, help="Comma list: cpu, gpu.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Audits at once; one per GPU.")
@click.option("--loglevel", "-l", default="info", show_default=True)
def worker_command(queues: str, concurrency: int, loglevel: str) -> None:
    """Run queued audits from the broker in REFINE_AUDIT_BROKER_URL."""
    from worker.celery_app import QUEUES, SETTINGS, app

    unknown = sorted({q.strip() for q in queues.split(",") if q.strip()} - set(QUEUES))
    if unknown:
        raise click.BadParameter(f"unknown queues {unknown}; known: {', '.join(QUEUES)}", param_hint="--queues")
    SETTINGS.data_dir.mkdir(parents=True, exist_ok=True)
    app.worker_main(argv=worker_argv(queues, concurrency, loglevel))


def register(group: click.Group) -> None:
    """Add ``worker`` to the ``refine-audit`` command group."""
    group.add_command(worker_command)


if __name__ == "__main__":
    worker_command()
