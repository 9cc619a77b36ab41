"""The portal in a real browser: see the plan of an audit before submitting it, submit it,
follow it live, read and download its report, see a refused upload explained, cancel a
running audit, and keep audits private.

One ``refine-audit serve`` runs the module's audits one at a time in-process; each test
waits for its own audit and checks only what it created, so any order works.
"""

from __future__ import annotations

import re
import time

import pytest
import requests
from e2e.portal_support import (
    Portal,
    browser,
    checkpoint,
    console,
    elapsed,
    fill_checkpoint_form,
    new_page,
    portal,
    save_screenshot,
    sign_in,
    status_badge,
    wait_status,
    wait_true,
)

pytestmark = pytest.mark.e2e

#: An audit's own page (the new-audit form is /audits/new, which must not match).
AUDIT_PAGE = re.compile(r"/audits/(?!new$)[A-Za-z0-9_-]+$")
#: The smoke-test audit takes 20-60 s on two shared cores; leave room for a busy machine.
AUDIT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def owner(portal: Portal) -> str:
    return portal.create_user("owner")


def test_submitted_audit_updates_live_to_succeeded_and_shows_the_report(portal, owner, checkpoint, new_page):
    page = new_page()
    sign_in(page, portal, owner)
    page.get_by_role("link", name="New audit").first.click()
    fill_checkpoint_form(page, checkpoint)
    plan = page.locator("#plan-preview table")
    wait_true(page, "[...document.querySelectorAll('#plan-preview th')].some(th => th.textContent === 'Effort')"
                    " && document.querySelector('#plan-preview td').textContent.startsWith('tiny')")
    shown = plan.text_content()  # not inner_text: the table's CSS upper-cases its headers
    assert "1 epoch over" in shown and "Estimated time" in shown  # the form's own settings
    save_screenshot(page, "new-audit-form")
    page.get_by_role("button", name="Start audit").click()
    page.wait_for_url(AUDIT_PAGE)
    audit_url = page.url

    # A marker on window survives only as long as the document does: a reload would drop it.
    page.evaluate("window.__sameDocument = true")
    started = time.monotonic()
    wait_status(page, ("running",), 120)
    page.wait_for_selector('#audit-progress:not([value="0"])', timeout=120_000)
    save_screenshot(page, "audit-running")
    assert wait_status(page, ("succeeded", "failed", "cancelled"), AUDIT_TIMEOUT_S) == "succeeded", page.inner_text("#audit-panel")
    print(f"audit succeeded after {elapsed(started)}")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded instead of updating live"
    assert page.url == audit_url

    page.wait_for_selector("#report")
    assert page.locator("#verdict-title").inner_text().strip()
    assert page.locator("#suspicion-before").inner_text().endswith("%")
    assert page.locator("svg.chart rect").count() == 4  # BA and ASR, before and after, for badnets
    wait_true(page, "[...document.querySelectorAll('figure img')].every(img => img.complete && img.naturalWidth > 0)")
    assert page.locator("figure img").count() >= 1
    save_screenshot(page, "audit-report", max_height=2000)
    save_screenshot(page, "audit-report-full")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Report PDF").click()
    pdf = download_info.value
    assert pdf.suggested_filename == "report.pdf"
    with open(pdf.path(), "rb") as handle:
        assert handle.read(5) == b"%PDF-"

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Audits").click()
    row = page.locator("table.audits tbody tr").first
    assert row.locator(".badge").get_attribute("data-status") == "succeeded"
    save_screenshot(page, "audits-list")


def test_random_bytes_as_checkpoint_show_an_error_next_to_the_model_field(portal, owner, tmp_path, new_page, console):
    console.allow(422)  # the refusal itself
    junk = tmp_path / "model.pt"
    junk.write_bytes(bytes(range(256)) * 40)
    page = new_page()
    sign_in(page, portal, owner)
    page.goto(portal.url("/audits/new"))
    fill_checkpoint_form(page, junk)
    page.get_by_role("button", name="Start audit").click()

    error = page.locator("#err-model")
    error.wait_for(state="visible")
    assert "checkpoint" in error.inner_text().lower()
    assert page.get_by_label("Checkpoint file").get_attribute("aria-invalid") == "true"
    assert page.url.endswith("/audits/new"), "a refused upload must keep the user on the form"
    save_screenshot(page, "new-audit-invalid-checkpoint")


def test_client_side_validation_stops_a_form_without_a_checkpoint(portal, owner, new_page):
    page = new_page()
    sign_in(page, portal, owner)
    page.goto(portal.url("/audits/new"))
    page.get_by_role("button", name="Start audit").click()
    assert page.locator("#err-model").inner_text() == "Choose a file to upload."
    page.get_by_label("Describe a model API").check()
    page.get_by_label("Prediction URL").fill("not a url")
    page.get_by_role("button", name="Start audit").click()
    assert page.locator("#err-api_url").is_visible()
    assert page.locator("#err-model").is_hidden()


def test_cancel_stops_a_running_audit(portal, owner, checkpoint, new_page):
    page = new_page()
    sign_in(page, portal, owner)
    page.goto(portal.url("/audits/new"))
    fill_checkpoint_form(page, checkpoint, epochs=200, train_size=2000)
    page.get_by_role("button", name="Start audit").click()
    page.wait_for_url(AUDIT_PAGE)
    wait_status(page, ("running",), AUDIT_TIMEOUT_S)  # after any audit still ahead of it in the queue

    started = time.monotonic()
    page.get_by_role("button", name="Cancel audit").click()
    assert wait_status(page, ("cancelled", "failed", "succeeded"), 120) == "cancelled"
    print(f"cancelled {elapsed(started)} after the click")
    assert page.locator("#failure-code").inner_text() == "cancelled"
    assert page.get_by_role("button", name="Cancel audit").count() == 0

    page.goto(portal.url("/audits"))
    assert page.locator("table.audits tbody tr").first.locator(".badge").get_attribute("data-status") == "cancelled"
    page.get_by_label("Status").select_option("cancelled")
    page.wait_for_url("**/audits?status=cancelled")
    statuses = page.locator("table.audits tbody .badge").evaluate_all("badges => badges.map(b => b.dataset.status)")
    assert statuses and set(statuses) == {"cancelled"}


def test_another_user_sees_neither_the_audit_nor_its_files(portal, owner, checkpoint, new_page, console):
    console.allow(404)  # the stranger's attempts
    token = portal.create_token(owner)
    with open(checkpoint, "rb") as model:
        created = requests.post(
            portal.url("/api/v1/audits"), headers={"Authorization": f"Bearer {token}"},
            files={"model": model}, data={"spec": '{"effort": "tiny", "data": {"train_size": 600, "test_size": 200}}'},
            timeout=60,
        )
    assert created.status_code == 202, created.text
    audit_id = created.json()["id"]
    try:
        page = new_page()
        sign_in(page, portal, portal.create_user("stranger"))
        assert page.locator("#no-audits").is_visible()
        for path in (f"/audits/{audit_id}", f"/audits/{audit_id}/report.pdf", f"/audits/{audit_id}/files/inputs/model"):
            response = page.goto(portal.url(path))
            assert response is not None and response.status == 404, path
        assert "Not found" in page.locator("h1").inner_text()
    finally:
        requests.post(portal.url(f"/api/v1/audits/{audit_id}/cancel"), headers={"Authorization": f"Bearer {token}"}, timeout=30)
