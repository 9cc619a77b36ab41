"""HTTP routes of the tokens resource."""

from __future__ import annotations

from flask import Blueprint, Response

from web.api.common import parse_json_body, reply
from web.api.registry import Body, Link, Reply, operation
from web.api.tokens import service
from web.api.tokens.schemas import TokenCreate, TokenCreated, TokenList, TokenOut
from web.auth import current_user_id

bp = Blueprint("tokens", __name__)


@operation(bp, "GET", "/tokens", summary="List your API tokens",
           replies={200: Reply("Newest first; secrets are never shown again.", TokenList)})
def list_tokens() -> Response:
    return reply(TokenList(items=[TokenOut.from_row(t) for t in service.list_own(current_user_id())]))


@operation(bp, "POST", "/tokens", summary="Create an API token",
           body=Body({"application/json": TokenCreate}),
           replies={201: Reply("The new token with its secret, shown this once.", TokenCreated,
                               links=(Link("tokens.revoke_token", {"token_id": "$response.body#/id"}),))},
           errors=(413, 415, 422))
def create_token() -> Response:
    request_body = parse_json_body(TokenCreate)
    token, plaintext = service.create(current_user_id(), request_body.name)
    created = TokenCreated(**TokenOut.from_row(token).model_dump(), token=plaintext, webhook_secret=token.webhook_secret)
    return reply(created, 201)


@operation(bp, "DELETE", "/tokens/<int:token_id>", summary="Revoke an API token",
           replies={204: Reply("Revoked; it no longer authenticates.")}, errors=(404,))
def revoke_token(token_id: int) -> Response:
    service.revoke(current_user_id(), token_id)
    return Response(status=204)
