"""``refine-audit remote …``: drive a refine-audit service from a shell or a CI job.

``remote submit`` is the pipeline gate: it submits a checkpoint (or a model API spec),
optionally waits with a progress bar, downloads the report, and turns the verdict into
an exit status a CI system understands (see ``EXIT_CODES``). The spec options are the
``audit`` command's own, so a spec means the same locally and remotely.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from auditor.client import RefineAuditClient, RemoteError, WaitTimeout, verdict_fails_gate

EXIT_PASSED = 0
EXIT_GATE_CLOSED = 1
EXIT_REFUSED = 2
EXIT_FAILED = 3
EXIT_WAIT_TIMEOUT = 4
EXIT_CANCELLED = 130
#: What each exit status of ``remote submit --wait`` means (``--help`` and docs/ci-gate.md show it).
EXIT_CODES = {
    EXIT_PASSED: "the audit succeeded and its verdict is below every --fail-on level (or: submitted, without --wait)",
    EXIT_GATE_CLOSED: "the audit succeeded and its verdict reached a --fail-on level: stop the pipeline",
    EXIT_REFUSED: "the service refused the submission (invalid spec, checkpoint or dataset; bad options)",
    EXIT_FAILED: "the audit failed, or the service could not be reached or refused the token",
    EXIT_WAIT_TIMEOUT: "--timeout passed before the audit ended (it keeps running on the service)",
    EXIT_CANCELLED: "the audit was cancelled",
}
FAIL_ON_LEVELS = ("suspicious", "likely_backdoored", "inconclusive")
#: The ``audit`` command's options that describe the spec (its output and local-run options are not sent).
LOCAL_ONLY_OPTIONS = frozenset({"model", "allow_host", "device", "out", "quiet", "help", "plan"})


def _exit_code_help() -> str:
    return "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


def connection_options(command: click.Command) -> click.Command:
    for option in reversed((
        click.option("--server", required=True, metavar="URL", help="The service, e.g. https://audit.example.com."),
        click.option("--token-env", default="REFINE_AUDIT_TOKEN", show_default=True, metavar="NAME",
                     help="Environment variable holding the API token (never pass tokens as arguments)."),
        click.option("--timeout-http", type=float, default=300.0, show_default=True,
                     help="Seconds per HTTP request (uploads of large checkpoints)."),
    )):
        command = option(command)
    return command


def make_client(server: str, token_env: str, timeout_http: float) -> RefineAuditClient:
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise click.UsageError(f"set the API token in the environment variable {token_env} (see --token-env)")
    try:
        return RefineAuditClient(server, token, timeout_s=timeout_http)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None


def fail(exc: RemoteError) -> None:
    click.secho(f"error [{exc.code}]: {exc.message}", fg="red", err=True)
    sys.exit(EXIT_REFUSED if exc.is_input_error else EXIT_FAILED)


class ProgressBar:
    """A tqdm bar over the audit's overall progress, titled with its stage."""

    def __init__(self, enabled: bool):
        self.bar = tqdm(total=100, unit="%", dynamic_ncols=True, disable=not enabled, file=sys.stderr,
                        bar_format="{desc:<22}{percentage:3.0f}%|{bar}| {elapsed}")

    def __call__(self, audit: dict[str, Any]) -> None:
        self.bar.set_description_str(f"{audit['status']}: {audit.get('stage') or '-'}", refresh=False)
        self.bar.update(round(100 * float(audit.get("progress") or 0.0)) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


@click.group()
def remote() -> None:
    """Use a refine-audit service: submit audits, gate pipelines, fetch reports.

    The token comes from an environment variable (--token-env, default REFINE_AUDIT_TOKEN),
    so it never appears in a process list or a CI log.
    """


def _spec_options() -> list[click.Parameter]:
    from auditor.cli import audit

    return [p for p in audit.params if p.name not in LOCAL_ONLY_OPTIONS]


@remote.command("submit", epilog="\b\nExit status with --wait:\n" + _exit_code_help())
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@connection_options
@click.option("--wait", is_flag=True, help="Wait for the audit to end and gate on its verdict.")
@click.option("--fail-on", "fail_on", multiple=True, type=click.Choice(FAIL_ON_LEVELS), default=("suspicious",),
              show_default=True, help="Verdict levels that close the gate (repeatable). suspicious includes "
              "likely_backdoored; inconclusive closes on an inconclusive verdict.")
@click.option("--timeout", "wait_timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option("--poll", type=float, default=5.0, show_default=True, help="Seconds between status polls.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Download report.json/html/pdf here when the audit ends.")
@click.option("--artifacts", "artifact_kinds", default=None, metavar="KINDS",
              help="Also download artifacts of these kinds into --report-dir (comma list, e.g. defended_model,transform; 'all').")
@click.option("--idempotency-key", default=None, help="Retries with the same key return the first audit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def submit(model: Path | None, server: str, token_env: str, timeout_http: float, wait: bool, fail_on: tuple[str, ...],
           wait_timeout: float | None, poll: float, report_dir: Path | None, artifact_kinds: str | None,
           idempotency_key: str | None, quiet: bool, **options: Any) -> None:
    """Submit MODEL (a checkpoint) or --api URL for an audit; with --wait, gate on the verdict.

    \b
    Examples:
      refine-audit remote submit model.pt --server https://audit.example.com --effort quick --wait
      refine-audit remote submit --api https://models.example.com/v1/models/m:predict --output labels \\
          --server https://audit.example.com --wait --fail-on likely_backdoored --report-dir audit-report
    """
    from auditor.cli import _build_spec
    from auditor.errors import AuditError
    from auditor.spec import parse_spec

    client = make_client(server, token_env, timeout_http)
    if (model is None) == (not options.get("api")):
        raise click.UsageError("name either a MODEL checkpoint or an --api URL")
    body = _build_spec({**options, "data": options.get("data") or "fashion-mnist"})
    try:
        parse_spec(body)  # refuse a bad spec here; the service fills in its own defaults
    except AuditError as exc:
        click.secho(f"error [{exc.code.value}]: {exc.message}", fg="red", err=True)
        sys.exit(EXIT_REFUSED)
    dataset = None if options.get("data") in (None, "fashion-mnist") else Path(options["data"])
    try:
        if model is not None:
            created = client.submit_checkpoint(model, body, dataset_path=dataset, idempotency_key=idempotency_key)
        else:
            created = client.submit_api(body, idempotency_key=idempotency_key)
    except RemoteError as exc:
        fail(exc)
    audit_id = created["id"]
    click.echo(audit_id)
    click.echo(f"submitted audit {audit_id} ({created['status']})", err=True)
    if not wait:
        return
    ended = _wait(client, audit_id, quiet, poll, wait_timeout)
    if report_dir is not None:
        _download_after_wait(client, audit_id, report_dir, artifact_kinds)
    sys.exit(_gate(ended, fail_on))


def _wait(client: RefineAuditClient, audit_id: str, quiet: bool, poll: float, timeout: float | None) -> dict[str, Any]:
    bar = ProgressBar(enabled=not quiet)
    try:
        return client.wait(audit_id, on_progress=bar, poll_s=poll, timeout_s=timeout)
    except WaitTimeout as exc:
        bar.close()
        click.secho(str(exc.message), fg="yellow", err=True)
        sys.exit(EXIT_WAIT_TIMEOUT)
    except RemoteError as exc:
        bar.close()
        fail(exc)
    finally:
        bar.close()
    raise AssertionError("unreachable")


def _fetch(client: RefineAuditClient, audit_id: str, folder: Path, kinds: str | None) -> list[Path]:
    """The report files, plus the artifacts of ``kinds`` (a comma list, or ``all``)."""
    written = client.download_report(audit_id, folder)
    if kinds:
        wanted = None if kinds == "all" else [k.strip() for k in kinds.split(",") if k.strip()]
        written += client.download_artifacts(audit_id, folder, wanted)
    return written


def _download_after_wait(client: RefineAuditClient, audit_id: str, folder: Path, kinds: str | None) -> None:
    """An audit cancelled before it started has no report: say so, and let the gate decide."""
    try:
        written = _fetch(client, audit_id, folder, kinds)
    except RemoteError as exc:
        if exc.code != "not_found":
            fail(exc)
        click.echo(f"no report to download: {exc.message}", err=True)
        return
    for path in written:
        click.echo(f"downloaded {path}", err=True)


def _gate(audit: dict[str, Any], fail_on: tuple[str, ...]) -> int:
    """Print the outcome and return the exit status (see ``EXIT_CODES``)."""
    status = audit["status"]
    if status == "cancelled":
        click.secho(f"audit {audit['id']} was cancelled", fg="yellow", err=True)
        return EXIT_CANCELLED
    if status != "succeeded":
        error = audit.get("error") or {}
        click.secho(f"audit {audit['id']} {status} [{error.get('code')}]: {error.get('message')}", fg="red", err=True)
        return EXIT_FAILED
    summary = audit.get("summary") or {}
    verdict = summary.get("verdict")
    # The evidence's own reading beside a tripped gate: the combined score's level when the audit has one.
    closed = verdict_fails_gate(verdict, fail_on, summary.get("score_level") or summary.get("probe_level"))
    colour = "red" if closed else "green"
    click.secho(f"verdict: {verdict} - {summary.get('headline', '')}", fg=colour, bold=True, err=True)
    click.secho(f"gate {'CLOSED' if closed else 'passed'} (--fail-on {','.join(fail_on)})", fg=colour, err=True)
    return EXIT_GATE_CLOSED if closed else EXIT_PASSED


@remote.command("status")
@click.argument("audit_id")
@connection_options
def status(audit_id: str, server: str, token_env: str, timeout_http: float) -> None:
    """Print an audit as JSON (status, stage, progress, summary, error)."""
    client = make_client(server, token_env, timeout_http)
    try:
        click.echo(json.dumps(client.get(audit_id), indent=2))
    except RemoteError as exc:
        fail(exc)


@remote.command("report")
@click.argument("audit_id")
@connection_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("audit-report"), show_default=True)
@click.option("--artifacts", "artifact_kinds", default=None, metavar="KINDS",
              help="Also download artifacts of these kinds (comma list; 'all').")
def report(audit_id: str, server: str, token_env: str, timeout_http: float, out: Path, artifact_kinds: str | None) -> None:
    """Download an ended audit's report (JSON, HTML, PDF) and optionally its artifacts."""
    client = make_client(server, token_env, timeout_http)
    try:
        written = _fetch(client, audit_id, out, artifact_kinds)
    except RemoteError as exc:
        fail(exc)
    for path in written:
        click.echo(path)


@remote.command("cancel")
@click.argument("audit_id")
@connection_options
def cancel(audit_id: str, server: str, token_env: str, timeout_http: float) -> None:
    """Cancel a queued audit now, or a running one after its current batch."""
    client = make_client(server, token_env, timeout_http)
    try:
        audit = client.cancel(audit_id)
    except RemoteError as exc:
        fail(exc)
    click.echo(f"audit {audit['id']}: {audit['status']}{' (stopping)' if audit.get('cancel_requested') else ''}", err=True)


submit.params.extend(_spec_options())
