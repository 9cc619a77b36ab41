"""The shape of an MLflow model reference, checked where the spec is validated.

Only two forms name a model unambiguously and for good: ``models:/<name>/<version>``
(a registered model version) and ``runs:/<run_id>/<path>`` (a file or folder of one
run's artifacts). Names and paths are restricted to characters that never need
escaping inside a URL path and can never climb out of an artifact folder (no ``.`` or
``..`` segment, no backslash, no leading slash), because the path is sent to the
tracking server's artifact proxy as part of a URL. The same patterns go into the JSON
Schema, so the OpenAPI document says what the REST API accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODEL_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,255}"
MODEL_VERSION = r"[1-9][0-9]{0,9}"
RUN_ID = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}"
PATH_SEGMENT = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}"
ARTIFACT_PATH = rf"{PATH_SEGMENT}(?:/{PATH_SEGMENT}){{0,31}}"
#: The whole reference, for the JSON Schema (anchored) and for ``parse_mlflow_uri``.
URI_PATTERN = rf"^(?:models:/{MODEL_NAME}/{MODEL_VERSION}|runs:/{RUN_ID}/{ARTIFACT_PATH})$"
PATH_PATTERN = rf"^{ARTIFACT_PATH}$"

_MODEL_URI = re.compile(rf"models:/(?P<name>{MODEL_NAME})/(?P<version>{MODEL_VERSION})")
_RUN_URI = re.compile(rf"runs:/(?P<run_id>{RUN_ID})/(?P<path>{ARTIFACT_PATH})")
_PATH = re.compile(ARTIFACT_PATH)

URI_HELP = "models:/<name>/<version> or runs:/<run_id>/<artifact path>"


@dataclass(frozen=True)
class MlflowReference:
    """A parsed reference: a registered model version, or a path in a run's artifacts."""

    uri: str
    name: str | None = None  # registered model (models:/)
    version: str | None = None
    run_id: str | None = None  # runs:/
    path: str = ""  # runs:/: the file or folder under the run's artifact root

    @property
    def is_model_version(self) -> bool:
        return self.name is not None


def parse_mlflow_uri(uri: str) -> MlflowReference:
    """The reference ``uri`` names; ``ValueError`` saying which forms exist when it is neither."""
    if (match := _MODEL_URI.fullmatch(uri)) is not None:
        return MlflowReference(uri, name=match["name"], version=match["version"])
    if (match := _RUN_URI.fullmatch(uri)) is not None:
        return MlflowReference(uri, run_id=match["run_id"], path=match["path"])
    raise ValueError(f"must be {URI_HELP} (letters, digits, '_', '-', '.' in paths; no '..' segments), not {uri!r}")


def check_artifact_path(path: str) -> str:
    """A relative artifact path that stays inside its folder; ``ValueError`` otherwise."""
    if _PATH.fullmatch(path) is None:
        raise ValueError("must be a relative path inside the model's artifacts (letters, digits, '_', '-', '.'; "
                         f"segments separated by '/', none of them '.' or '..'), not {path!r}")
    return path
