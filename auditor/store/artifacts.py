"""Artifact storage behind one ``ArtifactStore`` protocol: a local folder or any S3.

The embedded default is a folder (``LocalStore``); services use S3 (``S3Store``:
SeaweedFS in tests and dev, MinIO or AWS in production) so that no worker keeps files
another machine needs. Keys are relative POSIX paths at fixed places
(``audits/{id}/...``), so a re-run overwrites instead of duplicating; both stores refuse
keys that could escape their root. Every ``put`` returns the size and SHA-256 that the
``artifacts`` table records.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from auditor.settings import Settings

CHUNK_SIZE = 1024 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
S3_DELETE_BATCH = 1000  # the most keys one DeleteObjects call accepts

Source = Path | bytes


class ArtifactNotFound(FileNotFoundError):
    def __init__(self, key: str):
        super().__init__(f"No artifact at {key!r}.")
        self.key = key


class InvalidKey(ValueError):
    """A key that is absolute, contains ``..``/``.``/empty segments or backslashes."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


class ArtifactStore(Protocol):
    def put(self, key: str, source: Source, content_type: str = DEFAULT_CONTENT_TYPE) -> ObjectInfo: ...

    def get_bytes(self, key: str) -> bytes: ...

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def download_to(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def presigned_url(self, key: str, expires_s: int = 900) -> str | None: ...

    # Last, so the method name does not shadow the builtin in the other annotations.
    def list(self, prefix: str = "") -> list[str]: ...


def audit_prefix(audit_id: str) -> str:
    """Where all files of one audit live; ``delete_prefix(audit_prefix(id))`` removes them.

    The one place that spells the layout: ``audits/{id}/inputs/{model,dataset}`` for
    uploads, ``audits/{id}/{artifact name}`` for everything an audit writes.
    """
    return f"audits/{audit_id}/"


def artifact_key(audit_id: str, name: str) -> str:
    """Fixed key per artifact name: a re-run overwrites instead of duplicating."""
    return audit_prefix(audit_id) + name


def checkpoint_prefix(audit_id: str) -> str:
    """Where a running audit's REFINE checkpoints are mirrored, so a restart on another machine resumes."""
    return audit_prefix(audit_id) + "checkpoints/"


def input_name(name: str) -> str:
    """The artifact name of an upload (``model``, ``dataset``): ``inputs/model``."""
    return f"inputs/{name}"


def input_key(audit_id: str, name: str) -> str:
    """Where the web app stores an audit's upload and the worker downloads it from."""
    return artifact_key(audit_id, input_name(name))


def validate_key(key: str) -> str:
    """Reject keys that could escape the store's root or alias another key."""
    if not key or "\\" in key or "\x00" in key or key.startswith("/"):
        raise InvalidKey(f"invalid artifact key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"invalid artifact key {key!r}")
    return key


def validate_prefix(prefix: str, *, allow_empty: bool) -> str:
    """A prefix is a key, optionally ending in ``/``; the empty prefix only where harmless."""
    if prefix == "" and allow_empty:
        return prefix
    validate_key(prefix.removesuffix("/"))
    return prefix


def sha256_of(source: Source) -> tuple[int, str]:
    """Size and SHA-256 of bytes or a file, read in chunks so large models fit in memory."""
    return _copy_hashing(source, None)


# --- local folder ---------------------------------------------------------------------


class LocalStore:
    """Files under ``root``; writes are atomic (temp file + rename). No presigned URLs:
    the web app streams local artifacts itself. Content types live in the database."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(*PurePosixPath(validate_key(key)).parts).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidKey(f"artifact key {key!r} escapes the store")
        return path

    def put(self, key: str, source: Source, content_type: str = DEFAULT_CONTENT_TYPE) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                size, digest = _copy_hashing(source, out)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ObjectInfo(key=key, size=size, sha256=digest)

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._existing(key)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while chunk := handle.read(chunk_size):
                    yield chunk

        return chunks()

    def download_to(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._existing(key), path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(validate_prefix(prefix, allow_empty=False))
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        self._prune_empty_dirs()
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 900) -> str | None:
        return None

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFound(key)
        return path

    def _prune_empty_dirs(self) -> None:
        directories = [p for p in self.root.rglob("*") if p.is_dir()]
        for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):  # deepest first
            if not any(directory.iterdir()):
                directory.rmdir()

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix, allow_empty=True)
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not PurePosixPath(k).name.startswith(".tmp-"))


def _copy_hashing(source: Source, out: IO[bytes] | None) -> tuple[int, str]:
    """Size and SHA-256 of ``source``, copying it to ``out`` (if given) in the same pass."""
    if isinstance(source, bytes):
        if out is not None:
            out.write(source)
        return len(source), hashlib.sha256(source).hexdigest()
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            if out is not None:
                out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# --- S3 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = ""

    def __repr__(self) -> str:
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


def s3_client_config() -> Config:
    """Path-style addressing (S3-compatible servers on an IP have no bucket subdomains),
    adaptive retries for transient errors, and checksums only when the API requires
    them (recent botocore defaults send CRC trailers some S3-compatible servers reject)."""
    return Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        retries={"max_attempts": 5, "mode": "adaptive"},
        connect_timeout=5,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class S3Store:
    """Objects in ``bucket`` under an optional ``prefix``; keys exclude the prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        credentials: S3Credentials | None = None,
        region: str = "us-east-1",
        *,
        create_bucket: bool = True,
    ):
        self.bucket = bucket
        self.region = region
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=credentials.access_key_id if credentials else None,
            aws_secret_access_key=credentials.secret_access_key if credentials else None,
            config=s3_client_config(),
        )
        if create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        """Create the bucket when missing, so a fresh SeaweedFS or MinIO needs no setup."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            self._create_bucket()

    def _create_bucket(self) -> None:
        """AWS wants the region spelled out for every region except its default one."""
        if self.region == "us-east-1":
            self.client.create_bucket(Bucket=self.bucket)
        else:
            location = {"LocationConstraint": self.region}
            self.client.create_bucket(Bucket=self.bucket, CreateBucketConfiguration=location)

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, source: Source, content_type: str = DEFAULT_CONTENT_TYPE) -> ObjectInfo:
        size, digest = sha256_of(source)
        extra = {"ContentType": content_type, "Metadata": {"sha256": digest}}
        if isinstance(source, bytes):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=source, **extra)
        else:
            self.client.upload_file(str(source), self.bucket, self._key(key), ExtraArgs=extra)
        return ObjectInfo(key=key, size=size, sha256=digest)

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.open_stream(key))

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as error:
            raise _not_found_or(error, key) from error
        return body.iter_chunks(chunk_size)

    def download_to(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as error:
            raise _not_found_or(error, key) from error

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete_prefix(self, prefix: str) -> int:
        keys = [self.prefix + k for k in self.list(validate_prefix(prefix, allow_empty=False))]
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + S3_DELETE_BATCH]]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            _raise_refused_deletes(answer, prefix)
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 900) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix, allow_empty=True)
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys += [item["Key"].removeprefix(self.prefix) for item in page.get("Contents", [])]
        return sorted(keys)


def _raise_refused_deletes(answer: dict[str, Any], prefix: str) -> None:
    """A DeleteObjects call succeeds as a whole while refusing single keys: quiet mode lists only those."""
    refused = answer.get("Errors") or []
    if refused:
        first = refused[0]
        raise OSError(f"The store kept {len(refused)} object(s) under {prefix!r} it was asked to delete "
                      f"(first: {first.get('Key')!r}, {first.get('Code')}: {first.get('Message')}).")


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _not_found_or(error: ClientError, key: str) -> Exception:
    return ArtifactNotFound(key) if _error_code(error) in ("404", "NoSuchKey", "NotFound") else error


# --- from settings ----------------------------------------------------------------------


def store_from_url(url: str, settings: Settings) -> ArtifactStore:
    """``file:///path`` -> LocalStore; ``s3://bucket[/prefix]`` -> S3Store with the S3 settings."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStore(Path(parts.path))
    if parts.scheme == "s3" and parts.netloc:
        credentials = None
        if settings.aws_access_key_id:
            credentials = S3Credentials(settings.aws_access_key_id, settings.aws_secret_access_key or "")
        return S3Store(
            parts.netloc,
            parts.path,
            endpoint_url=settings.s3_endpoint_url,
            credentials=credentials,
            region=settings.aws_default_region,
        )
    raise ValueError(f"unsupported artifact store URL {url!r}: use file:///path or s3://bucket[/prefix]")
