"""The README's webhook verification snippet, run against a webhook the service delivered.

The whole chain a user relies on: ``refine-audit token create --json`` shows the
token's webhook secret once; an audit submitted over REST with that token records it;
cancelling the audit while it is still queued (the web process does that alone) leaves
a webhook owed; the sweep delivers it; and the stdlib-only snippet in README.md accepts
it with that secret -- and refuses it with the secret of a token created later, with a
changed body, or a stale timestamp.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import click
import pytest
from api_support import TINY_SPEC, auth, build_api, checkpoint  # noqa: F401 (fixture)
from click.testing import CliRunner
from worker_support import Receiver, receiver  # noqa: F401 (fixture)

from auditor.store.db import make_engine, make_session_factory
from web.cli import register
from worker.sweep import Sweep

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- webhook-verification -->"


def readme_verifier() -> Callable[..., bool]:
    """The Python block that follows the marker in README.md, executed as a user would paste it."""
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    assert block is not None, "the README lost its verification snippet"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102 -- our own documentation
    return namespace["verify_refine_audit_webhook"]


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Any]:
    group = click.Group("refine-audit")
    register(group)
    runner = CliRunner(env={"REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_ENV": "test"})
    return lambda *args: runner.invoke(group, list(args), catch_exceptions=False)


def test_readme_snippet_verifies_a_delivered_webhook_with_the_submitting_tokens_secret(
    cli: Callable[..., Any], tmp_path: Path, receiver: Receiver, checkpoint: bytes
) -> None:
    cli("user", "create", "--email", "hooks@example.com", "--password", "long enough")
    minted = json.loads(cli("token", "create", "--email", "hooks@example.com", "--json").stdout)
    later = cli("token", "create", "--email", "hooks@example.com", "--name", "later")
    later_secret = re.search(r"webhook signing secret.*: ([0-9a-f]{64})", later.stderr).group(1)
    engine = make_engine(f"sqlite:///{tmp_path / 'refine-audit.db'}")
    api = build_api(tmp_path, engine)

    spec = {**TINY_SPEC, "callback_url": receiver.url}
    response = api.submit(minted["token"], checkpoint, spec)
    assert response.status_code == 202, response.get_json()
    audit_id = response.get_json()["id"]
    assert api.client.post(f"/api/v1/audits/{audit_id}/cancel", headers=auth(minted["token"])).status_code == 202
    Sweep(api.settings, make_session_factory(engine), lambda: api.store).run()
    engine.dispose()

    (delivered,) = receiver.requests
    verify = readme_verifier()
    assert delivered.json()["audit_id"] == audit_id and delivered.json()["status"] == "cancelled"
    assert verify(delivered.body, delivered.headers, minted["webhook_secret"])
    assert not verify(delivered.body, delivered.headers, later_secret)
    assert not verify(delivered.body.replace(b"cancelled", b"succeeded"), delivered.headers, minted["webhook_secret"])
    stale = {**delivered.headers, "X-Refine-Audit-Timestamp": str(int(delivered.headers["X-Refine-Audit-Timestamp"]) - 3600)}
    assert not verify(delivered.body, stale, minted["webhook_secret"])
