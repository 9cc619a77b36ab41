"""The portal's one-line progress detail, including where a split audit's positive controls run."""

from __future__ import annotations

from web.portal.progress import detail_text


def test_a_split_audit_shows_where_each_control_runs() -> None:
    detail = {"stage": "evaluate", "done": 2, "total": 4,
              "parts": {"blended": "running on worker-2@host", "badnets": "done on worker-2@host"}}
    assert detail_text("running", detail) == (
        "step 2 of 4 \u00b7 controls: badnets done on worker-2@host, blended running on worker-2@host")


def test_an_ended_audit_shows_no_detail() -> None:
    assert detail_text("succeeded", {"parts": {"badnets": "done on w"}}) == ""
