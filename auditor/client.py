"""A Python client for the refine-audit REST API (``/api/v1``), for scripts and CI pipelines.

It needs only ``requests``: an MLOps job that gates a model on an audit should not have
to install a web framework. Every call maps the API's error envelope
(``{"error": {"code", "message", "detail"}}``) to a ``RemoteError`` carrying the same
stable code and the HTTP status, so a pipeline can branch on ``exc.code``.

Typical use::

    client = RefineAuditClient("https://audit.example.com", token)
    audit = client.submit_checkpoint("model.pt", {"effort": "quick"})
    done = client.wait(audit["id"], on_progress=lambda a: print(a["stage"], a["progress"]))
    if done["summary"]["verdict"] != "no_evidence":
        client.download_report(done["id"], "audit-report")
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote

import requests

API_PREFIX = "/api/v1"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
REPORT_FORMATS = ("json", "html", "pdf")
#: Verdict levels from least to most alarming; ``inconclusive`` stands apart (the evidence was too weak to say).
VERDICT_SEVERITY = {"no_evidence": 0, "suspicious": 1, "likely_backdoored": 2}
MAX_POLL_FAILURES = 5  # consecutive failed polls ``wait`` rides out (back-off grows with each)
ProgressFn = Callable[[dict[str, Any]], None]


class RemoteError(Exception):
    """The service refused or failed a request; ``code`` is its stable error code (a string,
    so codes added by a newer server still arrive intact)."""

    def __init__(self, code: str, message: str, *, status: int | None = None, detail: dict[str, Any] | None = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail or {}

    @property
    def is_input_error(self) -> bool:
        """The request itself was refused (4xx other than auth/missing): fix the submission, not the service."""
        return self.status is not None and self.status in (400, 413, 415, 422)


class ServiceUnreachable(RemoteError):
    """No answer from the service (connection refused, DNS, timeout)."""

    def __init__(self, message: str):
        super().__init__("service_unavailable", message)


class WaitTimeout(RemoteError):
    """``wait`` gave up before the audit ended; the audit itself keeps running."""

    def __init__(self, audit_id: str, seconds: float, last: dict[str, Any]):
        super().__init__("wait_timeout", f"Audit {audit_id} had not ended after {seconds:.0f} s "
                         f"(status {last.get('status')}, stage {last.get('stage')}).", detail={"audit": last})


@dataclass
class RefineAuditClient:
    """One service and one API token; thread-safe as far as ``requests.Session`` is."""

    server_url: str  # e.g. https://audit.example.com (the /api/v1 prefix is added)
    token: str = field(repr=False)  # an API token, ``ra_...`` (``refine-audit token create``)
    timeout_s: float = 60.0  # per HTTP request; uploads of large checkpoints may need more
    verify: bool | str = True  # TLS: True, False, or a CA bundle path for a private CA
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.server_url = self.server_url.rstrip("/")
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError(f"server_url must start with http:// or https://, not {self.server_url!r}")
        self.session.headers.update({"Authorization": f"Bearer {self.token}", "Accept": "application/json"})

    # -- submitting ------------------------------------------------------------------------------------------------

    def submit_checkpoint(
        self, model_path: str | Path, spec: Mapping[str, Any] | None = None, *, dataset_path: str | Path | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Upload a checkpoint (and optionally a dataset) with an AuditSpec; returns the queued audit."""
        model_path = Path(model_path)
        with open(model_path, "rb") as model_file:
            files: dict[str, Any] = {"model": (model_path.name, model_file, "application/octet-stream")}
            if dataset_path is None:
                return self._submit(files=files, data={"spec": json.dumps(dict(spec or {}))}, key=idempotency_key)
            dataset_path = Path(dataset_path)
            with open(dataset_path, "rb") as dataset_file:
                files["dataset"] = (dataset_path.name, dataset_file, "application/zip")
                return self._submit(files=files, data={"spec": json.dumps(dict(spec or {}))}, key=idempotency_key)

    def submit_api(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Audit a model behind a prediction API: ``spec["model"]`` is ``{"source": "api", "api": {...}}``."""
        return self._submit(json_body=dict(spec), key=idempotency_key)

    def _submit(self, *, files: Any = None, data: Any = None, json_body: Any = None, key: str | None) -> dict[str, Any]:
        headers = {"Idempotency-Key": key} if key else {}
        return self._json("POST", "/audits", files=files, data=data, json=json_body, headers=headers,
                          expect=(200, 202))

    # -- reading ---------------------------------------------------------------------------------------------------

    def get(self, audit_id: str) -> dict[str, Any]:
        """The audit: status, stage, progress, summary (with the verdict once it succeeded), error."""
        return self._json("GET", f"/audits/{_segment(audit_id)}")

    def wait(
        self, audit_id: str, *, on_progress: ProgressFn | None = None, poll_s: float = 2.0,
        timeout_s: float | None = None, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any]:
        """Poll until the audit ends and return it; ``on_progress`` sees every poll's audit.

        A failed or cancelled audit is returned, not raised: the caller decides what
        that means for its pipeline. ``WaitTimeout`` after ``timeout_s`` (the audit keeps running).
        """
        started, failures = clock(), 0
        while True:
            try:
                audit = self.get(audit_id)
                failures = 0
            except RemoteError as exc:  # a restarting server or a proxy blip must not fail an hours-long gate
                failures += 1
                if not _transient(exc) or failures > MAX_POLL_FAILURES:
                    raise
                sleep(poll_s * failures)
                continue
            if on_progress is not None:
                on_progress(audit)
            if audit["status"] in TERMINAL_STATUSES:
                return audit
            if timeout_s is not None and clock() - started >= timeout_s:
                raise WaitTimeout(audit_id, timeout_s, audit)
            sleep(poll_s)

    def cancel(self, audit_id: str) -> dict[str, Any]:
        """Queued: cancelled at once. Running: stops after its current batch. Ended: ``conflict``."""
        return self._json("POST", f"/audits/{_segment(audit_id)}/cancel", expect=(202,))

    def artifacts(self, audit_id: str) -> list[dict[str, Any]]:
        """Every stored file of the audit: name, kind, size, sha256, download link."""
        return list(self._json("GET", f"/audits/{_segment(audit_id)}/artifacts")["items"])

    def report(self, audit_id: str) -> dict[str, Any]:
        """The JSON report (the contract documented in docs/report-schema.md)."""
        return self._json("GET", f"/audits/{_segment(audit_id)}/report.json")

    # -- downloading -----------------------------------------------------------------------------------------------

    def download_report(self, audit_id: str, dest_dir: str | Path, formats: Iterable[str] = REPORT_FORMATS) -> list[Path]:
        """``report.json|html|pdf`` into ``dest_dir``; ``report_not_ready`` while the audit runs."""
        written = []
        for fmt in formats:
            if fmt not in REPORT_FORMATS:
                raise ValueError(f"report format must be one of {REPORT_FORMATS}, not {fmt!r}")
            written.append(self._download(f"/audits/{_segment(audit_id)}/report.{fmt}", Path(dest_dir) / f"report.{fmt}"))
        return written

    def download_artifact(self, audit_id: str, name: str, dest: str | Path) -> Path:
        """One artifact, streamed to ``dest`` (a file path) and checked against its listed size."""
        return self._download(f"/audits/{_segment(audit_id)}/artifacts/{_segment(name)}", Path(dest))

    def download_artifacts(self, audit_id: str, dest_dir: str | Path, kinds: Iterable[str] | None = None) -> list[Path]:
        """Every artifact (or those of the given kinds, e.g. ``defended_model``) into ``dest_dir``, by name."""
        wanted = None if kinds is None else set(kinds)
        written = []
        for item in self.artifacts(audit_id):
            if wanted is not None and item["kind"] not in wanted:
                continue
            target = _safe_join(Path(dest_dir), item["name"])
            written.append(self.download_artifact(audit_id, item["name"], target))
        return written

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, *, expect: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        response = self._request(method, path, expect, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise RemoteError("bad_response", f"{method} {path} answered something that is not JSON.",
                              status=response.status_code) from exc

    def _download(self, path: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        with self._request("GET", path, (200,), stream=True) as response:
            expected = response.headers.get("Content-Length")
            size = 0
            with open(partial, "wb") as handle:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    handle.write(chunk)
                    size += len(chunk)
        if expected is not None and expected.isdigit() and int(expected) != size:
            partial.unlink(missing_ok=True)
            raise RemoteError("bad_response", f"Download of {path} stopped at {size} of {expected} bytes.")
        partial.replace(dest)
        return dest

    def _request(self, method: str, path: str, expect: tuple[int, ...], **kwargs: Any) -> requests.Response:
        url = f"{self.server_url}{API_PREFIX}{path}"
        headers = kwargs.pop("headers", None) or {}
        try:
            response = self.session.request(method, url, headers=headers, timeout=self.timeout_s, verify=self.verify,
                                            allow_redirects=True, **kwargs)
        except requests.RequestException as exc:
            raise ServiceUnreachable(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code not in expect:
            with response:
                raise _error_from(response, method, path)
        return response


def _error_from(response: requests.Response, method: str, path: str) -> RemoteError:
    """The API's envelope as a ``RemoteError``; anything else (a proxy's HTML page) keeps its status."""
    try:
        body = response.json()
        error = body["error"]
        return RemoteError(str(error["code"]), str(error["message"]), status=response.status_code,
                           detail=error.get("detail") or {})
    except (ValueError, KeyError, TypeError):
        text = response.text[:200].strip()
        return RemoteError("bad_response", f"{method} {path} answered HTTP {response.status_code}: {text}",
                           status=response.status_code)


def _transient(exc: RemoteError) -> bool:
    return isinstance(exc, ServiceUnreachable) or exc.status in (502, 503, 504)


def _segment(value: str) -> str:
    """One URL path segment; ids and artifact names cannot climb out of their route."""
    if not value or value in (".", ".."):
        raise ValueError(f"not a valid path segment: {value!r}")
    return quote(value, safe="")


def _safe_join(folder: Path, name: str) -> Path:
    """A server-chosen file name, confined to ``folder`` (artifact names may contain sub-folders)."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise RemoteError("bad_response", f"The service named an artifact outside the folder: {name!r}.")
    return target


def verdict_fails_gate(verdict: str | None, fail_on: Iterable[str], probe_level: str | None = None) -> bool:
    """Whether a verdict closes a pipeline gate set to ``fail_on`` levels.

    ``suspicious`` closes on suspicious and likely_backdoored; ``likely_backdoored`` only on
    that; ``inconclusive`` on any inconclusive verdict. An inconclusive verdict is also judged
    by what its probes read (``probe_level``, in the audit's summary): a backdoor reading is
    never waved through because the audit could not stand behind its other figures. An
    unknown level (a newer server) closes the gate: a gate that cannot read the verdict must
    not pass the model.
    """
    levels = set(fail_on)
    if verdict == "inconclusive":
        return "inconclusive" in levels or (probe_level is not None and verdict_fails_gate(probe_level, levels))
    if verdict in VERDICT_SEVERITY:
        return any(VERDICT_SEVERITY[verdict] >= VERDICT_SEVERITY[level] for level in levels if level in VERDICT_SEVERITY)
    return True
