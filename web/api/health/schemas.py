"""The health reply: one status per component, so an operator sees *what* is down."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ComponentHealth(BaseModel):
    status: Literal["ok", "error"]
    detail: str | None = Field(None, description="Mode (e.g. in-process) or the error's type; never secrets.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    components: dict[str, ComponentHealth] = Field(description="database, broker and store.")
