"""A small client of an MLflow tracking server's REST API, over ``requests``.

refine-audit needs a handful of calls: read a model version and where its files are,
read a run, list and download artifacts, upload the report files, set and delete tags.
The ``mlflow`` package would bring dozens of dependencies (and its own pickle-based
model loaders) into the worker for that, so this speaks the documented REST API
(``/api/2.0/mlflow/...``) and reads artifacts only through the tracking server's
artifact proxy (``/api/2.0/mlflow-artifacts/artifacts``, ``mlflow server
--serve-artifacts``, the default since MLflow 2): the worker needs no credentials of
the artifact store behind it.

Every failure becomes an ``AuditError`` with a stable code: ``mlflow_unreachable``
(connection refused, timeout, 5xx), ``mlflow_not_found`` (no such model, version, run
or artifact), ``mlflow_auth_failed`` (401/403) or ``mlflow_bad_response``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from auditor.errors import AuditError, ErrorCode

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
CHUNK = 1 << 20
MAX_LISTED = 2000  # artifact entries read while looking for the checkpoint; a model folder holds a handful
MAX_DEPTH = 4


@dataclass(frozen=True)
class ArtifactEntry:
    """One file or folder under a listed artifact folder (``path`` relative to it)."""

    path: str
    is_dir: bool
    size: int | None = None


class MlflowClient:
    """The calls refine-audit makes, against one tracking server; credentials come from its URL."""

    def __init__(self, tracking_uri: str, timeout_s: float = 30.0, retries: int = 2):
        parts = urlsplit(tracking_uri)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if parts.username is not None:
            from urllib.parse import unquote

            self.session.auth = (unquote(parts.username), unquote(parts.password or ""))
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.5,
                      status_forcelist=(502, 503, 504), allowed_methods=None, raise_on_status=False)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    def close(self) -> None:
        self.session.close()

    # -- registry and runs ----------------------------------------------------------------------------------------

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        body = self._json("GET", f"{API}/model-versions/get", f"model version {name}/{version}",
                          params={"name": name, "version": version})
        return _field(body, "model_version", dict)

    def model_version_download_uri(self, name: str, version: str) -> str:
        body = self._json("GET", f"{API}/model-versions/get-download-uri", f"model version {name}/{version}",
                          params={"name": name, "version": version})
        return _field(body, "artifact_uri", str)

    def run_info(self, run_id: str) -> dict[str, Any]:
        body = self._json("GET", f"{API}/runs/get", f"run {run_id}", params={"run_id": run_id})
        return _field(_field(body, "run", dict), "info", dict)

    def logged_model_artifact_uri(self, model_id: str) -> str:
        body = self._json("GET", f"{API}/logged-models/{quote(model_id, safe='')}", f"logged model {model_id}")
        return _field(_field(_field(body, "model", dict), "info", dict), "artifact_uri", str)

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._json("POST", f"{API}/model-versions/set-tag", f"model version {name}/{version}",
                   body={"name": name, "version": version, "key": key, "value": value})

    def delete_model_version_tag(self, name: str, version: str, key: str) -> None:
        self._json("DELETE", f"{API}/model-versions/delete-tag", f"tag {key}",
                   body={"name": name, "version": version, "key": key}, missing_ok=True)

    def set_run_tag(self, run_id: str, key: str, value: str) -> None:
        self._json("POST", f"{API}/runs/set-tag", f"run {run_id}", body={"run_id": run_id, "key": key, "value": value})

    def delete_run_tag(self, run_id: str, key: str) -> None:
        self._json("POST", f"{API}/runs/delete-tag", f"tag {key}", body={"run_id": run_id, "key": key}, missing_ok=True)

    # -- artifacts, through the server's proxy ------------------------------------------------------------------

    def proxy_path(self, artifact_uri: str) -> str:
        """Where ``artifact_uri`` lives under the artifact proxy: ``mlflow-artifacts:/0/<run>/artifacts/model`` ->
        ``0/<run>/artifacts/model``; ``runs:/`` and ``models:/m-...`` (MLflow 3 logged models) are followed."""
        parts = urlsplit(artifact_uri)
        if parts.scheme == "mlflow-artifacts":
            return parts.path.strip("/")
        if parts.scheme == "runs":
            run_id, _, sub = artifact_uri[len("runs:/"):].partition("/")
            return _join(self.proxy_path(_field(self.run_info(run_id), "artifact_uri", str)), sub)
        if parts.scheme == "models" and artifact_uri.startswith("models:/m-"):
            model_id, _, sub = artifact_uri[len("models:/"):].partition("/")
            return _join(self.proxy_path(self.logged_model_artifact_uri(model_id)), sub)
        raise AuditError(
            ErrorCode.MLFLOW_BAD_RESPONSE,
            f"The artifacts are at {_scheme_only(artifact_uri)}, which the tracking server does not proxy: refine-audit "
            "reads model files only through the server's artifact proxy (mlflow server --serve-artifacts).",
            {"artifact_scheme": parts.scheme},
        )

    def list_artifacts(self, path: str) -> list[ArtifactEntry]:
        """The entries directly under ``path`` (empty for a file or a missing path: the proxy answers both alike)."""
        body = self._json("GET", ARTIFACTS, f"artifact folder {path}", params={"path": path})
        files = body.get("files") or []
        if not isinstance(files, list):
            raise _bad("the artifact listing is not a list")
        entries = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise _bad("an artifact listing entry has no path")
            size = item.get("file_size")
            entries.append(ArtifactEntry(item["path"].rsplit("/", 1)[-1], bool(item.get("is_dir")),
                                         int(size) if isinstance(size, (int, str)) and str(size).isdigit() else None))
        return entries

    def walk_artifacts(self, path: str) -> list[ArtifactEntry]:
        """Every file under ``path`` (relative paths), a few levels deep, at most ``MAX_LISTED`` entries."""
        found: list[ArtifactEntry] = []
        pending = [("", 0)]
        while pending:
            folder, depth = pending.pop()
            for entry in self.list_artifacts(_join(path, folder)):
                relative = _join(folder, entry.path)
                if entry.is_dir and depth < MAX_DEPTH:
                    pending.append((relative, depth + 1))
                elif not entry.is_dir:
                    found.append(ArtifactEntry(relative, False, entry.size))
                if len(found) > MAX_LISTED:
                    raise _bad(f"the model's artifact folder holds more than {MAX_LISTED} files")
        return sorted(found, key=lambda e: e.path)

    def download_artifact(self, path: str, target: Path, max_bytes: int) -> int:
        """Stream one file to ``target``; cut off past ``max_bytes`` (``payload_too_large``), as uploads are."""
        response = self._call("GET", f"{ARTIFACTS}/{quote(path, safe='/')}", f"artifact {path}", stream=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            with response, open(target, "wb") as handle:
                for chunk in response.iter_content(CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise AuditError(
                            ErrorCode.PAYLOAD_TOO_LARGE,
                            f"The MLflow model file {path.rsplit('/', 1)[-1]} is larger than the limit of "
                            f"{max_bytes / (1 << 20):g} MiB per model file (REFINE_AUDIT_MAX_UPLOAD_MB).",
                            {"field": "model.mlflow", "max_bytes": max_bytes},
                        )
                    handle.write(chunk)
        except requests.RequestException as exc:
            target.unlink(missing_ok=True)
            raise self._unreachable(exc) from None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return written

    def upload_artifact(self, path: str, source: Path, content_type: str) -> None:
        with open(source, "rb") as handle:
            self._call("PUT", f"{ARTIFACTS}/{quote(path, safe='/')}", f"artifact {path}", data=handle,
                       headers={"Content-Type": content_type})

    # -- plumbing -----------------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, what: str, *, params: dict[str, str] | None = None,
              body: dict[str, Any] | None = None, missing_ok: bool = False) -> dict[str, Any]:
        response = self._call(method, path, what, params=params, json=body, missing_ok=missing_ok)
        if not response.ok:  # a missing thing the caller said was fine (deleting a tag that is not there)
            return {}
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            raise _bad(f"{what}: the answer is not JSON") from None
        if not isinstance(payload, dict):
            raise _bad(f"{what}: the answer is not a JSON object")
        return payload

    def _call(self, method: str, path: str, what: str, *, missing_ok: bool = False, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, self.base + path, timeout=self.timeout_s, allow_redirects=False,
                                            **kwargs)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from None
        if response.ok:
            return response
        error_code, message = _server_error(response)
        missing = response.status_code == 404 or error_code == "RESOURCE_DOES_NOT_EXIST"
        if missing and missing_ok:
            return response
        response.close()
        if response.status_code in (401, 403):
            raise AuditError(ErrorCode.MLFLOW_AUTH_FAILED,
                             f"The MLflow tracking server at {self.base} refused our credentials ({response.status_code}).",
                             {"status": response.status_code})
        if missing:
            raise AuditError(ErrorCode.MLFLOW_NOT_FOUND, f"MLflow has no {what} ({message or response.status_code}).",
                             {"status": response.status_code})
        if response.status_code >= 500:
            raise AuditError(ErrorCode.MLFLOW_UNREACHABLE,
                             f"The MLflow tracking server at {self.base} failed ({response.status_code}): {message}",
                             {"status": response.status_code})
        raise AuditError(ErrorCode.MLFLOW_BAD_RESPONSE,
                         f"The MLflow tracking server refused the request for {what} ({response.status_code}): {message}",
                         {"status": response.status_code})

    def _unreachable(self, exc: requests.RequestException) -> AuditError:
        why = "did not answer in time" if isinstance(exc, requests.Timeout) else f"is unreachable ({type(exc).__name__})"
        return AuditError(ErrorCode.MLFLOW_UNREACHABLE, f"The MLflow tracking server at {self.base} {why}.")


def _server_error(response: requests.Response) -> tuple[str, str]:
    """MLflow's ``{"error_code", "message"}``, or the start of whatever else it sent."""
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return "", response.text[:300].strip()
    if isinstance(body, dict):
        return str(body.get("error_code", "")), str(body.get("message", ""))[:500]
    return "", ""


def _field(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise _bad(f"the answer has no {name}")
    return value


def _bad(message: str) -> AuditError:
    return AuditError(ErrorCode.MLFLOW_BAD_RESPONSE, f"Unexpected answer from the MLflow tracking server: {message}.")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _scheme_only(uri: str) -> str:
    """``s3://bucket/...`` without credentials or the full path: enough to say where, nothing secret."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}/..." if parts.scheme else "an unknown location"
