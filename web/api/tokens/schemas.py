"""Token shapes: the plaintext appears only in the creation reply, never again."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from auditor.store.models import ApiToken


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="A label to tell tokens apart, e.g. ci.")


class TokenOut(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="The token's first characters, to recognise it.")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, token: ApiToken) -> TokenOut:
        return cls(
            id=token.id, name=token.name, prefix=token.prefix, created_at=token.created_at,
            last_used_at=token.last_used_at, revoked_at=token.revoked_at,
        )


class TokenCreated(TokenOut):
    token: str = Field(description="The secret; shown this once only.")
    webhook_secret: str = Field(description="HMAC key that signs this token's completion webhooks.")


class TokenList(BaseModel):
    items: list[TokenOut]
