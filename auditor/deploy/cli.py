"""``refine-audit serve-defended``: put an API audit's defense in front of the audited API."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from auditor.errors import AuditError


@click.command("serve-defended")
@click.option("--upstream", required=True, metavar="URL",
              help="The audited model API: its v1 ':predict' / v2 '/infer' URL, or its base URL.")
@click.option("--defense", required=True, metavar="AUDIT_DIR_OR_ID",
              help="An audit's output folder (transform.safetensors, defense.json, report.json) or an audit id on --server.")
@click.option("--protocol", type=click.Choice(["v1", "v2"]), default=None, help="Override the audited protocol.")
@click.option("--model-name", default=None, help="Override the audited model name.")
@click.option("--input-layout", type=click.Choice(["nchw", "nhwc"]), default=None, help="Override the audited input layout.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 in a container).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--upstream-auth-header", default=None, metavar="NAME", help="Header carrying the upstream's credential, e.g. Authorization.")
@click.option("--upstream-auth-env", default=None, metavar="VAR", help="Environment variable holding that header's value.")
@click.option("--upstream-auth-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Or a file holding it (a mounted secret); never pass the secret itself.")
@click.option("--allow-host", multiple=True, help="Allow an upstream host the SSRF guard would refuse (the model server's "
              "private name or address); adds to REFINE_AUDIT_ALLOWED_HOSTS.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds for one upstream call.")
@click.option("--retries", type=int, default=1, show_default=True, help="Extra upstream attempts after 429/5xx/timeouts.")
@click.option("--batch-size", type=int, default=None, help="Images per upstream request [default: the audited batch size].")
@click.option("--max-batch", type=int, default=512, show_default=True, help="Largest batch a client may send.")
@click.option("--max-request-mb", type=int, default=32, show_default=True, help="Largest request body, in MiB.")
@click.option("--max-in-flight", type=int, default=8, show_default=True, help="Requests worked on at once.")
@click.option("--server", default=None, metavar="URL", help="The refine-audit service holding the audit (with an audit id).")
@click.option("--token-env", default="REFINE_AUDIT_TOKEN", show_default=True, metavar="NAME",
              help="Environment variable holding the service's API token.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where T runs [default: REFINE_AUDIT_DEVICE].")
def serve_defended(upstream: str, defense: str, protocol: str | None, model_name: str | None, input_layout: str | None,
                   host: str, port: int, upstream_auth_header: str | None, upstream_auth_env: str | None,
                   upstream_auth_file: Path | None, allow_host: tuple[str, ...], timeout: float, retries: int,
                   batch_size: int | None, max_batch: int, max_request_mb: int, max_in_flight: int, server: str | None,
                   token_env: str, device: str | None) -> None:
    """Serve the defended model M ∘ API ∘ T in the upstream's own protocol: a drop-in replacement URL.

    \b
    Example:
      refine-audit serve-defended --upstream http://model:9000/v1/models/model:predict \\
          --defense out/audit/out --allow-host model --host 0.0.0.0 --port 8080
    Clients then POST to http://<this host>:8080/v1/models/model:predict as before.
    Health: GET /healthz (process), GET /readyz (the upstream answers).
    """
    from auditor.blackbox.client import ApiConfig
    from auditor.cli import fail
    from auditor.deploy.defense import load_defense
    from auditor.deploy.endpoint import DefendedEndpoint, EndpointLimits
    from auditor.runtime import resolve_device
    from auditor.settings import Settings, SettingsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if upstream_auth_env and upstream_auth_file:
        raise click.UsageError("give --upstream-auth-env or --upstream-auth-file, not both")
    if (upstream_auth_env or upstream_auth_file) and not upstream_auth_header:
        raise click.UsageError("--upstream-auth-env/--upstream-auth-file need --upstream-auth-header")
    try:
        folder = _defense_folder(defense, server, token_env, settings.data_dir / "defenses")
        bundle = load_defense(folder, {"protocol": protocol, "model_name": model_name, "input_layout": input_layout})
        if bundle.api is None:
            raise click.UsageError("the defense does not record the upstream's protocol (a checkpoint audit?); pass --protocol")
        config = ApiConfig(
            url=upstream, num_classes=bundle.num_classes, protocol=bundle.api.protocol, model_name=bundle.api.model_name,
            input_layout=bundle.api.input_layout, auth_header=upstream_auth_header, auth_env=upstream_auth_env,
            auth_value=upstream_auth_file.read_text().strip() if upstream_auth_file else None,
            batch_size=batch_size or bundle.api.batch_size, timeout_s=timeout, max_retries=retries, query_budget=None,
        )
        config.secret_headers()  # a missing secret variable fails now, not on the first request
        limits = EndpointLimits(max_request_bytes=max_request_mb * 1024 * 1024, max_batch=max_batch,
                                max_in_flight=max_in_flight)
        endpoint = DefendedEndpoint(bundle, config, host=host, port=port, limits=limits,
                                    allowed_hosts=(*settings.allowed_hosts, *allow_host),
                                    device=resolve_device(device or settings.device))
    except AuditError as exc:
        fail(exc)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"defended endpoint for audit {bundle.audit_id or folder} on {endpoint.url}{endpoint.predict_path} "
               f"-> {upstream} ({bundle.api.protocol}); health /healthz, readiness /readyz", err=True)
    try:
        endpoint.serve_forever()
    except KeyboardInterrupt:
        pass


def _defense_folder(defense: str, server: str | None, token_env: str, cache_dir: Path) -> Path:
    """A local folder as given, or the audit's defense files downloaded from ``server``."""
    if Path(defense).is_dir():
        return Path(defense)
    if server is None:
        raise click.UsageError(f"{defense!r} is not a folder; to use an audit id, name the service with --server")
    from auditor.client import RefineAuditClient, RemoteError
    from auditor.deploy.defense import fetch_defense

    token = os.environ.get(token_env, "").strip()
    if not token:
        raise click.UsageError(f"set the service's API token in {token_env} (see --token-env)")
    try:
        return fetch_defense(RefineAuditClient(server, token), defense, cache_dir)
    except RemoteError as exc:
        raise click.ClickException(f"could not download the defense of audit {defense}: [{exc.code}] {exc.message}") from None
