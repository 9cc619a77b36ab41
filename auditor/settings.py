"""One typed settings object, parsed from the environment once at start-up.

Every process (CLI, web, worker) builds ``Settings.from_env()`` once and passes the
object down, so nothing else reads ``os.environ``. Parsing validates every value and
fails fast with a ``SettingsError`` naming the offending variable: a typo in a
deployment should stop the service at boot, not surface as a confusing error in the
middle of a six-hour audit. Everything has an embedded default except the secret key
in production, so ``refine-audit`` works with no configuration at all.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit

DEFAULT_DATA_DIR = "~/.local/share/refine-audit"
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
ENVIRONMENTS = ("development", "test", "production")
DEVICES = ("auto", "cpu", "cuda")
SANDBOXES = ("bwrap", "none")
#: The only value of REFINE_AUDIT_UNSAFE_NO_SANDBOX that lets production run submitted models unsandboxed.
UNSAFE_NO_SANDBOX_CONSENT = "i-understand-models-run-unsandboxed"
#: Thread-count variables of the numeric libraries, passed through to sandboxed audits.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
BROKER_SCHEMES = ("redis", "rediss", "memory")
LOG_FORMATS = ("text", "json")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgres")
MIN_SECRET_KEY_LENGTH = 32
HARD_LIMIT_GRACE_S = 120  # soft time limit -> hard kill: time to record ``time_limit`` and upload nothing more
VISIBILITY_MARGIN_S = 600  # beyond the hard limit, so Redis never redelivers a healthy audit's message


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Variable:
    """One documented environment variable (what ``Settings.describe`` lists for the README)."""

    name: str
    default: str
    help: str


VARIABLES: tuple[Variable, ...] = (
    Variable("REFINE_AUDIT_ENV", "development", "development | test | production; production requires a secret key."),
    Variable("REFINE_AUDIT_DATA_DIR", DEFAULT_DATA_DIR, "Where the embedded defaults (SQLite file, artifacts) live."),
    Variable("REFINE_AUDIT_DATABASE_URL", "sqlite:///{data_dir}/refine-audit.db", "SQLAlchemy URL (PostgreSQL)."),
    Variable("REFINE_AUDIT_BROKER_URL", "(unset: in-process)", "Celery broker, e.g. redis://127.0.0.1:6379/0."),
    Variable("REFINE_AUDIT_ARTIFACTS", "file://{data_dir}/artifacts", "file:///path or s3://bucket[/prefix]."),
    Variable("S3_ENDPOINT_URL", "(unset: AWS)", "S3-compatible endpoint (SeaweedFS, MinIO) for s3:// artifacts."),
    Variable("AWS_ACCESS_KEY_ID", "(unset: boto3 default chain)", "S3 access key."),
    Variable("AWS_SECRET_ACCESS_KEY", "(unset: boto3 default chain)", "S3 secret key."),
    Variable("AWS_DEFAULT_REGION", "us-east-1", "S3 region (also used to sign presigned URLs)."),
    Variable("REFINE_AUDIT_DEVICE", "auto", "auto | cpu | cuda; auto picks CUDA when present."),
    Variable("REFINE_AUDIT_SECRET_KEY", "(random per process outside production)", "Signs sessions and CSRF tokens."),
    Variable("REFINE_AUDIT_ALLOWED_HOSTS", "(empty)", "Comma list of hosts exempt from the SSRF guard."),
    Variable("REFINE_AUDIT_MAX_UPLOAD_MB", "512", "Largest accepted file, in MiB, for the model and the dataset each (a request carries at most both plus 1 MiB of other fields)."),
    Variable("REFINE_AUDIT_FMNIST_DIR", DEFAULT_FMNIST_DIR, "Folder holding the built-in Fashion-MNIST files."),
    Variable("REFINE_AUDIT_AUDIT_TIME_LIMIT_S", "21600", "Hard time limit of one audit, in seconds (6 h)."),
    Variable("REFINE_AUDIT_HEARTBEAT_TIMEOUT_S", "300",
             "A running audit silent this long has lost its worker: it is retried, then failed with worker_lost."),
    Variable("REFINE_AUDIT_LOST_WORKER_RETRIES", "1",
             "How many times an audit whose worker died is restarted (from its last REFINE checkpoint)."),
    Variable("REFINE_AUDIT_SWEEP_INTERVAL_S", "30",
             "How often a worker (one at a time, elected by a database lock) sweeps for lost work."),
    Variable("REFINE_AUDIT_REPUBLISH_AFTER_S", "300",
             "A queued audit published this long ago is published again if the broker lost its message "
             "(or a worker took it this long ago and never started it)."),
    Variable("REFINE_AUDIT_VISIBILITY_TIMEOUT_S", "(time limit + 720)",
             "Redis redelivers an unacknowledged message after this long; longer than any audit."),
    Variable("REFINE_AUDIT_TASK_MAX_RETRIES", "3", "Retries of an audit after a transient S3 or database failure."),
    Variable("REFINE_AUDIT_TASK_RETRY_BACKOFF_S", "10", "First delay before such a retry; doubles each time."),
    Variable("REFINE_AUDIT_TASK_RETRY_BACKOFF_MAX_S", "120", "Longest delay between such retries."),
    Variable("REFINE_AUDIT_RESULT_BACKEND", "(unset: none)",
             "Celery result backend URL; the database row is the truth, so none is needed."),
    Variable("REFINE_AUDIT_SANDBOX", "bwrap", "bwrap | none: run each audit of a submitted model in a bubblewrap sandbox."),
    Variable("REFINE_AUDIT_UNSAFE_NO_SANDBOX", "(unset)",
             f"Set to `{UNSAFE_NO_SANDBOX_CONSENT}` to let production start without a working sandbox."),
    Variable("REFINE_AUDIT_SANDBOX_MEMORY_MB", "8192", "Memory limit (RLIMIT_DATA) of each process of a sandboxed audit, in MiB."),
    Variable("REFINE_AUDIT_SANDBOX_CPU_S", "(2 x the audit time limit)", "CPU-time limit of a sandboxed audit, in seconds."),
    Variable("REFINE_AUDIT_CONTROL_CACHE", "on",
             "on | off: reuse positive controls trained by earlier audits (kept in the artifact store under "
             "control-cache/), instead of training them again."),
    Variable("REFINE_AUDIT_SPLIT_AUDITS", "on",
             "on | off: a Celery worker sends each positive control of an audit to the queue as its own task, so "
             "idle workers train them while the audit's own task runs (needs the control cache; in-process mode "
             "and the CLI never split)."),
    Variable("REFINE_AUDIT_LOG_FORMAT", "text", "text | json: json writes one object per line, with the audit id while an audit runs."),
    Variable("REFINE_AUDIT_MLFLOW_TRACKING_URI", "(unset: no MLflow source)",
             "http(s):// URL of the MLflow tracking server that `model.mlflow` references (models:/, runs:/) are read "
             "from and audit results written back to; user:password@ in it is sent as basic auth."),
)


@dataclass(frozen=True)
class Settings:
    """Validated configuration of one process; build it with ``Settings.from_env``."""

    env: str
    data_dir: Path
    database_url: str
    broker_url: str | None  # None: the CLI runs audits in-process, no queue
    artifacts_url: str
    s3_endpoint_url: str | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None = field(repr=False)
    aws_default_region: str
    device: str
    secret_key: str = field(repr=False)
    allowed_hosts: tuple[str, ...]
    max_upload_mb: int
    fmnist_dir: Path
    audit_time_limit_s: int
    heartbeat_timeout_s: int
    lost_worker_retries: int
    sweep_interval_s: int
    republish_after_s: int
    visibility_timeout_s: int
    task_max_retries: int
    task_retry_backoff_s: int
    task_retry_backoff_max_s: int
    result_backend: str | None
    sandbox: str
    unsafe_no_sandbox: bool
    sandbox_memory_mb: int
    sandbox_cpu_s: int
    thread_env: tuple[tuple[str, str], ...]  # THREAD_VARIABLES that are set, for sandboxed audits
    log_format: str  # json for log shippers (one object per line); text for people
    mlflow_tracking_uri: str | None = field(default=None, repr=False)  # may carry credentials
    control_cache: bool = True  # reuse cached positive controls (auditor/store/control_cache.py)
    split_audits: bool = True  # Celery workers run positive controls as their own tasks (worker/parts.py)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Parse and validate; raises ``SettingsError`` naming the first bad variable."""
        get = _reader(env)
        mode = _choice("REFINE_AUDIT_ENV", get("REFINE_AUDIT_ENV") or "development", ENVIRONMENTS)
        data_dir = Path(get("REFINE_AUDIT_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().absolute()
        time_limit = _positive_int(get, "REFINE_AUDIT_AUDIT_TIME_LIMIT_S", 6 * 3600)
        return cls(
            env=mode,
            data_dir=data_dir,
            database_url=_database_url(get("REFINE_AUDIT_DATABASE_URL") or f"sqlite:///{data_dir}/refine-audit.db"),
            broker_url=_broker_url(get("REFINE_AUDIT_BROKER_URL")),
            artifacts_url=_artifacts_url(get("REFINE_AUDIT_ARTIFACTS") or f"file://{data_dir}/artifacts"),
            s3_endpoint_url=_http_url("S3_ENDPOINT_URL", get("S3_ENDPOINT_URL")),
            aws_access_key_id=get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            aws_default_region=get("AWS_DEFAULT_REGION") or "us-east-1",
            device=_choice("REFINE_AUDIT_DEVICE", (get("REFINE_AUDIT_DEVICE") or "auto").lower(), DEVICES),
            secret_key=_secret_key(get("REFINE_AUDIT_SECRET_KEY"), production=mode == "production"),
            allowed_hosts=_host_list(get("REFINE_AUDIT_ALLOWED_HOSTS")),
            max_upload_mb=_positive_int(get, "REFINE_AUDIT_MAX_UPLOAD_MB", 512),
            fmnist_dir=Path(get("REFINE_AUDIT_FMNIST_DIR") or DEFAULT_FMNIST_DIR).expanduser(),
            audit_time_limit_s=time_limit,
            heartbeat_timeout_s=_positive_int(get, "REFINE_AUDIT_HEARTBEAT_TIMEOUT_S", 300),
            lost_worker_retries=_whole_number(get, "REFINE_AUDIT_LOST_WORKER_RETRIES", 1),
            sweep_interval_s=_positive_int(get, "REFINE_AUDIT_SWEEP_INTERVAL_S", 30),
            republish_after_s=_positive_int(get, "REFINE_AUDIT_REPUBLISH_AFTER_S", 300),
            visibility_timeout_s=_positive_int(
                get, "REFINE_AUDIT_VISIBILITY_TIMEOUT_S", time_limit + HARD_LIMIT_GRACE_S + VISIBILITY_MARGIN_S
            ),
            task_max_retries=_whole_number(get, "REFINE_AUDIT_TASK_MAX_RETRIES", 3),
            task_retry_backoff_s=_positive_int(get, "REFINE_AUDIT_TASK_RETRY_BACKOFF_S", 10),
            task_retry_backoff_max_s=_positive_int(get, "REFINE_AUDIT_TASK_RETRY_BACKOFF_MAX_S", 120),
            result_backend=_result_backend(get("REFINE_AUDIT_RESULT_BACKEND")),
            sandbox=_choice("REFINE_AUDIT_SANDBOX", (get("REFINE_AUDIT_SANDBOX") or "bwrap").lower(), SANDBOXES),
            unsafe_no_sandbox=_unsafe_consent(get("REFINE_AUDIT_UNSAFE_NO_SANDBOX")),
            sandbox_memory_mb=_positive_int(get, "REFINE_AUDIT_SANDBOX_MEMORY_MB", 8192),
            sandbox_cpu_s=_positive_int(get, "REFINE_AUDIT_SANDBOX_CPU_S", 2 * time_limit),
            thread_env=tuple((name, value) for name in THREAD_VARIABLES if (value := get(name))),
            log_format=_choice("REFINE_AUDIT_LOG_FORMAT", (get("REFINE_AUDIT_LOG_FORMAT") or "text").lower(), LOG_FORMATS),
            mlflow_tracking_uri=_mlflow_tracking_uri(get("REFINE_AUDIT_MLFLOW_TRACKING_URI")),
            control_cache=_choice("REFINE_AUDIT_CONTROL_CACHE", (get("REFINE_AUDIT_CONTROL_CACHE") or "on").lower(),
                                  ("on", "off")) == "on",
            split_audits=_choice("REFINE_AUDIT_SPLIT_AUDITS", (get("REFINE_AUDIT_SPLIT_AUDITS") or "on").lower(),
                                 ("on", "off")) == "on",
        )

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def hard_time_limit_s(self) -> int:
        """When a worker kills an audit that ignored its (soft) time limit."""
        return self.audit_time_limit_s + HARD_LIMIT_GRACE_S

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @staticmethod
    def describe() -> str:
        """A Markdown table of every variable, its default and meaning, for the README."""
        rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
        rows += [f"| `{v.name}` | `{v.default}` | {v.help} |" for v in VARIABLES]
        return "\n".join(rows)


def _reader(env: Mapping[str, str]) -> Callable[[str], str | None]:
    """Blank values count as unset, so ``FOO=`` in a compose file means "use the default"."""

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    return get


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SettingsError(name, f"must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _positive_int(get: Callable[[str], str | None], name: str, default: int) -> int:
    return _bounded_int(get, name, default, minimum=1)


def _whole_number(get: Callable[[str], str | None], name: str, default: int) -> int:
    """Zero allowed: e.g. no retries at all."""
    return _bounded_int(get, name, default, minimum=0)


def _bounded_int(get: Callable[[str], str | None], name: str, default: int, *, minimum: int) -> int:
    raw = get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"must be a whole number, not {raw!r}") from None
    if value < minimum:
        problem = "must be positive" if minimum == 1 else f"must be at least {minimum}"
        raise SettingsError(name, f"{problem}, not {value}")
    return value


def _database_url(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in DATABASE_SCHEMES:
        raise SettingsError("REFINE_AUDIT_DATABASE_URL", f"must be a sqlite:// or postgresql:// URL, not {url!r}")
    return url


def _broker_url(url: str | None) -> str | None:
    if url is not None and urlsplit(url).scheme not in BROKER_SCHEMES:
        raise SettingsError("REFINE_AUDIT_BROKER_URL", f"must be a redis:// URL, not {url!r}")
    return url


def _result_backend(url: str | None) -> str | None:
    if url is not None and "://" not in url:
        raise SettingsError("REFINE_AUDIT_RESULT_BACKEND", f"must be a URL such as redis://host/1, not {url!r}")
    return url


def _artifacts_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path.startswith("/"):
        return url
    if parts.scheme == "s3" and parts.netloc:
        return url
    problem = f"must be file:///absolute/path or s3://bucket[/prefix], not {url!r}"
    raise SettingsError("REFINE_AUDIT_ARTIFACTS", problem)


def _http_url(name: str, url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(name, f"must be an http(s):// URL, not {url!r}")
    return url


def _mlflow_tracking_uri(url: str | None) -> str | None:
    """Only a server we talk to over HTTP: file stores and ``databricks`` profiles need the mlflow package."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # the value may hold a password: name the problem, not the value
        raise SettingsError("REFINE_AUDIT_MLFLOW_TRACKING_URI", "must be the http(s):// URL of an MLflow tracking server")
    return url.rstrip("/")


def _secret_key(value: str | None, *, production: bool) -> str:
    """Production refuses to start without a real key; elsewhere a random one is fine."""
    if value is None:
        if production:
            raise SettingsError("REFINE_AUDIT_SECRET_KEY", "is required when REFINE_AUDIT_ENV=production")
        return secrets.token_urlsafe(MIN_SECRET_KEY_LENGTH)
    if production and len(value) < MIN_SECRET_KEY_LENGTH:
        problem = f"must be at least {MIN_SECRET_KEY_LENGTH} characters in production"
        raise SettingsError("REFINE_AUDIT_SECRET_KEY", problem)
    return value


def _unsafe_consent(value: str | None) -> bool:
    """Only the exact phrase counts: a stray ``1`` or ``true`` must not switch the sandbox off."""
    if value is None:
        return False
    if value != UNSAFE_NO_SANDBOX_CONSENT:
        raise SettingsError("REFINE_AUDIT_UNSAFE_NO_SANDBOX", f"must be unset or exactly {UNSAFE_NO_SANDBOX_CONSENT!r}")
    return True


def _host_list(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())
