"""MLflow as a model source: fetch the checkpoint before the sandbox, write the outcome back after it.

``registry_runner(runner, config)`` wraps the runner a process uses (sandboxed or not),
so the worker, ``refine-audit serve`` and the CLI all get the same behaviour. For a spec
with ``model.mlflow`` it runs on the trusted side, around the audit:

1. **Fetch**: resolve the reference (``models:/name/version`` -> the version's artifacts;
   ``runs:/id/path`` -> that path of the run's artifacts), pick the checkpoint file
   (``model.mlflow.path``, or the one file with a checkpoint extension), download it
   through the tracking server's artifact proxy under the upload size limit, and run the
   same static container checks an upload gets. A pickle -- what ``mlflow.pytorch``
   writes by default before MLflow 3, or any ``.pkl`` -- is refused here with
   ``invalid_checkpoint`` and never reaches a loader.
2. **Audit**: the wrapped runner gets the downloaded file as ``model_path``, exactly
   like an uploaded checkpoint: it is loaded only inside the sandbox, which has no
   network for checkpoint audits. ``model.mlflow.path`` in the spec (and so in the
   report) names the file that was chosen.
3. **Write back** (unless ``model.mlflow.write_back`` is false): the report files go to
   the source run's artifacts under ``refine-audit/<audit id>/``, then ``refine_audit.*``
   tags (status, verdict, suspicion, BA before/after, the audit id, where the report
   is; the error code of a failed audit) go on the model version -- or on the run, for
   ``runs:/`` references. Tags of an earlier audit that this one does not set are
   removed, so the tags always describe one audit. A write-back failure never fails
   the audit: it is logged and added to the report's warnings.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from auditor.errors import AuditError, ErrorCode
from auditor.registry.mlflow import ArtifactEntry, MlflowClient
from auditor.registry.uri import MlflowReference, parse_mlflow_uri

log = logging.getLogger(__name__)

Runner = Callable[..., Any]

#: Extensions a checkpoint file may have; pickles are included so that they are found and refused by name.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt2", ".pt", ".pts", ".pth", ".ts", ".torchscript", ".ckpt", ".bin",
                       ".pkl", ".pickle", ".joblib")
ACCEPTED_FORMATS = ("TorchScript (torch.jit.save), a torch.export program (.pt2), safetensors (with the architecture "
                    "in its metadata or in model.architecture) or a zip-format state dict of plain tensors")
TAG_PREFIX = "refine_audit."
REPORT_FOLDER = "refine-audit"
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value
#: Every tag the write-back may set; those an audit does not set are deleted, so no stale value survives.
TAG_KEYS = ("audit_id", "status", "verdict", "headline", "probe_level", "suspicion_before", "suspicion_after",
            "ba_before", "ba_after", "agreement", "controls_asr_before", "controls_asr_after", "fit_to_deploy",
            "gates_tripped", "error_code", "error_message", "finished_at", "report")
#: Fetch failures that leave nothing to tag: the server, the model or its version could not be reached.
UNTAGGABLE = frozenset({ErrorCode.MLFLOW_UNREACHABLE, ErrorCode.MLFLOW_NOT_FOUND, ErrorCode.MLFLOW_AUTH_FAILED,
                        ErrorCode.MLFLOW_BAD_RESPONSE})
SUMMARY_TAGS = ("verdict", "headline", "probe_level", "suspicion_before", "suspicion_after", "ba_before", "ba_after",
                "agreement", "controls_asr_before", "controls_asr_after", "fit_to_deploy")


@dataclass(frozen=True)
class MlflowConfig:
    """What the operator configured: the tracking server, and the largest model file to fetch."""

    tracking_uri: str | None
    max_bytes: int
    timeout_s: float = 30.0


def mlflow_config(settings: Any) -> MlflowConfig:
    """From ``auditor.settings.Settings``."""
    return MlflowConfig(settings.mlflow_tracking_uri, settings.max_upload_bytes)


@dataclass(frozen=True)
class FetchedModel:
    """The checkpoint file of a reference, and where the outcome is written back."""

    reference: MlflowReference
    path: Path  # the downloaded file
    artifact_path: str  # the file inside the reference's artifacts (model.mlflow.path)
    run_id: str | None  # the run whose artifacts receive the report files (None: a version with no run)


def registry_runner(runner: Runner, config: MlflowConfig) -> Runner:
    """``runner`` for uploads and APIs; for ``model.mlflow`` specs, fetch first and write back after."""

    def run(spec: Any, inputs: Any, on_progress: Callable[..., None] = lambda *_: None,
            should_cancel: Callable[[], bool] = lambda: False, on_metrics: Any = None) -> Any:
        if spec.model.mlflow is None:
            return runner(spec, inputs, on_progress, should_cancel, on_metrics)
        return audit_from_mlflow(runner, config, spec, inputs, on_progress, should_cancel, on_metrics)

    run.__wrapped__ = runner  # type: ignore[attr-defined]
    return run


def audit_from_mlflow(runner: Runner, config: MlflowConfig, spec: Any, inputs: Any, on_progress: Callable[..., None],
                      should_cancel: Callable[[], bool], on_metrics: Any) -> Any:
    """Fetch, audit, write back (module docstring); a fetch failure ends the audit as an upload refusal would."""
    from auditor.pipeline.state import AuditResult

    out = Path(inputs.work_dir) / "out"
    reference = parse_mlflow_uri(spec.model.mlflow.uri)
    if config.tracking_uri is None:
        error = AuditError(ErrorCode.MLFLOW_UNREACHABLE, "This service has no MLflow tracking server configured "
                                                         "(REFINE_AUDIT_MLFLOW_TRACKING_URI).")
        return AuditResult("failed", out, summary={"status": "failed"}, error=error.to_dict())
    client = MlflowClient(config.tracking_uri, timeout_s=config.timeout_s)
    try:
        target = Path(inputs.work_dir) / "inputs" / "mlflow-model"
        try:
            fetched = fetch_model(client, reference, spec.model.mlflow.path, target, config.max_bytes)
        except AuditError as exc:
            log.warning("audit %s: model %s not fetched: %s %s", inputs.audit_id, reference.uri, exc.code.value,
                        exc.message)
            result = AuditResult("failed", out, summary={"status": "failed"}, error=exc.to_dict())
            if exc.code not in UNTAGGABLE and spec.model.mlflow.write_back:  # the model exists: say why it was refused
                write_back_quietly(client, FetchedModel(reference, target, "", reference.run_id), result,
                                    inputs.audit_id)
            return result
        if should_cancel():
            from auditor.errors import AuditCancelled

            return AuditResult("cancelled", out, error=AuditCancelled().to_dict())
        mlflow = spec.model.mlflow.model_copy(update={"path": fetched.artifact_path})
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"mlflow": mlflow})})
        result = runner(spec, replace(inputs, model_path=fetched.path), on_progress, should_cancel, on_metrics)
        if spec.model.mlflow.write_back:
            write_back_quietly(client, fetched, result, inputs.audit_id)
        return result
    finally:
        client.close()


# ---------------------------------------------------------------------------- fetch


def check_reference(tracking_uri: str, uri: str, timeout_s: float = 10.0) -> None:
    """At submission: the model version (or run) exists, so a typo is a 422 now rather than a failed audit later.

    Only metadata is read; the file is fetched (and checked) by the worker.
    """
    reference = parse_mlflow_uri(uri)
    client = MlflowClient(tracking_uri, timeout_s=timeout_s, retries=0)
    try:
        if reference.is_model_version:
            client.model_version(reference.name, reference.version)
        else:
            client.run_info(reference.run_id)
    finally:
        client.close()



def fetch_model(client: MlflowClient, reference: MlflowReference, path: str | None, target: Path,
                max_bytes: int) -> FetchedModel:
    """Download the reference's checkpoint to ``target`` (plus its extension) and check its container."""
    location, run_id = _artifact_location(client, reference)
    entry = _choose_checkpoint(client, reference, location, path)
    if entry.size is not None and entry.size > max_bytes:
        raise AuditError(ErrorCode.PAYLOAD_TOO_LARGE,
                         f"{reference.uri}: {entry.path} is larger than the limit of {max_bytes / (1 << 20):g} MiB "
                         "per model file (REFINE_AUDIT_MAX_UPLOAD_MB).", {"field": "model.mlflow", "max_bytes": max_bytes})
    local = target.with_name(target.name + PurePosixPath(entry.path).suffix.lower())
    size = client.download_artifact(_join(location, entry.path), local, max_bytes)
    log.info("fetched %s (%s, %d bytes) from MLflow", reference.uri, entry.path or "the file itself", size)
    _check_container(reference, entry.path, local)
    return FetchedModel(reference, local, entry.path, run_id)


def _artifact_location(client: MlflowClient, reference: MlflowReference) -> tuple[str, str | None]:
    """The proxy path of the reference's artifacts, and the run that receives the report files."""
    if reference.is_model_version:
        version = client.model_version(reference.name, reference.version)
        status = version.get("status", "READY")
        if status != "READY":
            raise AuditError(ErrorCode.MLFLOW_NOT_FOUND,
                             f"{reference.uri} is not ready to be read (status {status}).", {"status": status})
        location = client.proxy_path(client.model_version_download_uri(reference.name, reference.version))
        return location, version.get("run_id") or None
    info = client.run_info(reference.run_id)
    root = info.get("artifact_uri")
    if not isinstance(root, str):
        raise AuditError(ErrorCode.MLFLOW_BAD_RESPONSE, f"MLflow did not say where run {reference.run_id} keeps its artifacts.")
    return _join(client.proxy_path(root), reference.path), reference.run_id


def _choose_checkpoint(client: MlflowClient, reference: MlflowReference, location: str,
                       path: str | None) -> ArtifactEntry:
    """``path`` when given; else the one file with a checkpoint extension; a bare file reference is itself."""
    if path is not None:
        return ArtifactEntry(path, False)
    files = client.walk_artifacts(location)
    if not files:  # a reference to a file (or to nothing: the download then says not found)
        return ArtifactEntry("", False)
    candidates = [f for f in files if PurePosixPath(f.path).suffix.lower() in CHECKPOINT_SUFFIXES]
    if len(candidates) == 1:
        return candidates[0]
    listed = ", ".join(f.path for f in (candidates or files)[:20])
    if not candidates:
        raise AuditError(ErrorCode.INVALID_CHECKPOINT,
                         f"{reference.uri} holds no checkpoint file (it holds: {listed}). refine-audit accepts "
                         f"{ACCEPTED_FORMATS}.", {"field": "model.mlflow"})
    message = f"several files could be the checkpoint ({listed}); name one in model.mlflow.path"
    raise AuditError(ErrorCode.INVALID_SPEC, f"model.mlflow.path: {message}",
                     {"fields": [{"field": "model.mlflow.path", "message": message}]})


def _check_container(reference: MlflowReference, artifact_path: str, local: Path) -> None:
    """The upload's static checks; a refusal says what was refused and what would be accepted."""
    from auditor.models.containers import inspect_checkpoint

    try:
        inspect_checkpoint(local)
    except AuditError as exc:
        local.unlink(missing_ok=True)
        where = f"{reference.uri} ({artifact_path})" if artifact_path else reference.uri
        raise AuditError(
            ErrorCode.INVALID_CHECKPOINT,
            f"{where} was refused: {exc.message} refine-audit never unpickles a model; log it to MLflow as "
            f"{ACCEPTED_FORMATS}.", {**exc.detail, "field": "model.mlflow"},
        ) from None


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# ---------------------------------------------------------------------------- write back


def write_back_quietly(client: MlflowClient, fetched: FetchedModel, result: Any, audit_id: str) -> None:
    """``write_back``; whatever fails becomes a warning in the logs and the report, never the audit's failure."""
    for warning in write_back(client, fetched, result, audit_id):
        log.warning("audit %s: %s", audit_id, warning)
        _add_warning(result, warning)


def write_back(client: MlflowClient, fetched: FetchedModel, result: Any, audit_id: str) -> list[str]:
    """Report files to the run, then tags on the version (or run); returns the warnings of what failed."""
    warnings: list[str] = []
    folder = f"{REPORT_FOLDER}/{_folder_name(audit_id)}"
    report_link = None
    reports = [a for a in result.artifacts if a.kind == "report" and a.path.is_file()]
    if reports and fetched.run_id is None:
        warnings.append(f"MLflow write-back: {fetched.reference.uri} has no source run, so the report files were not "
                        "logged to MLflow.")
    elif reports:
        try:
            root = client.proxy_path(_artifact_root(client, fetched.run_id))
            for artifact in sorted(reports, key=lambda a: a.name):
                client.upload_artifact(_join(root, folder, artifact.name), artifact.path, artifact.content_type)
            report_link = f"runs:/{fetched.run_id}/{folder}/"
        except AuditError as exc:
            warnings.append(f"MLflow write-back: the report files were not logged to run {fetched.run_id}: {exc.message}")
    tags = outcome_tags(result, audit_id, report_link)
    try:
        _set_tags(client, fetched.reference, tags)
    except AuditError as exc:
        warnings.append(f"MLflow write-back: the {TAG_PREFIX}* tags were not set on {fetched.reference.uri}: {exc.message}")
    return warnings


def _artifact_root(client: MlflowClient, run_id: str) -> str:
    root = client.run_info(run_id).get("artifact_uri")
    if not isinstance(root, str):
        raise AuditError(ErrorCode.MLFLOW_BAD_RESPONSE, f"MLflow did not say where run {run_id} keeps its artifacts.")
    return root


def outcome_tags(result: Any, audit_id: str, report_link: str | None) -> dict[str, str]:
    """The audit's outcome as ``refine_audit.*`` tag values (strings, as MLflow stores them)."""
    summary = result.summary or {}
    values: dict[str, Any] = {"audit_id": audit_id, "status": result.status,
                              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    values.update({key: summary[key] for key in SUMMARY_TAGS if summary.get(key) is not None})
    gates = _tripped_gates(summary, result.report)
    if gates is not None:
        values["gates_tripped"] = ",".join(gates) or "none"
    if result.error:
        values["error_code"] = result.error.get("code")
        values["error_message"] = result.error.get("message")
    if report_link:
        values["report"] = report_link
    return {TAG_PREFIX + key: _tag_value(value) for key, value in values.items() if value is not None}


def _tripped_gates(summary: dict[str, Any], report: dict[str, Any] | None) -> list[str] | None:
    """From the summary, or from the report (a sandboxed audit's summary keeps scalars only)."""
    if isinstance(summary.get("gates_tripped"), list):
        return [str(name) for name in summary["gates_tripped"]]
    gates = (report or {}).get("gates")
    if not isinstance(gates, list):
        return None
    return [str(g.get("name")) for g in gates if isinstance(g, dict) and g.get("tripped")]


def _tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)[:MAX_TAG_CHARS]


def _set_tags(client: MlflowClient, reference: MlflowReference, tags: dict[str, str]) -> None:
    stale = [TAG_PREFIX + key for key in TAG_KEYS if TAG_PREFIX + key not in tags]
    if reference.is_model_version:
        for key, value in tags.items():
            client.set_model_version_tag(reference.name, reference.version, key, value)
        for key in stale:
            client.delete_model_version_tag(reference.name, reference.version, key)
    else:
        for key, value in tags.items():
            client.set_run_tag(reference.run_id, key, value)
        for key in stale:
            client.delete_run_tag(reference.run_id, key)


def _folder_name(audit_id: str) -> str:
    """The audit id; a CLI audit (always ``local``) gets a timestamp so runs do not overwrite each other."""
    if audit_id == "local":
        return "local-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in audit_id)[:100] or "audit"


def _add_warning(result: Any, warning: str) -> None:
    """Into the result's report and its report.json (validated again), and the audit's log file."""
    out = Path(result.out_dir)
    log_file = out / "audit.log"
    if log_file.is_file():
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"{dt.datetime.now().isoformat(sep=' ', timespec='seconds')} WARNING auditor.registry: {warning}\n")
    if result.report is None:
        return
    result.report.setdefault("warnings", []).append(warning)
    report_json = out / "report.json"
    if not report_json.is_file():
        return
    try:
        from auditor.report.schema import validate_report

        report_json.write_text(validate_report(result.report).model_dump_json(indent=2) + "\n", encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 -- the warning is in the logs either way
        log.warning("could not add the write-back warning to report.json: %s", exc)
