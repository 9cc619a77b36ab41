"""The portal shows the recovered trigger: the audit page's trigger section names the suspected class,
the anomaly index and the trigger's success rate with its sample size, and shows the trigger's picture."""

from __future__ import annotations

import re

import pytest
import requests
from e2e.portal_support import browser, checkpoint, console, new_page, portal, save_screenshot, sign_in, wait_status, wait_true

pytestmark = pytest.mark.e2e

__all__ = ["browser", "checkpoint", "console", "new_page", "portal"]  # fixtures, imported for pytest

AUDIT_TIMEOUT_S = 300
#: The smallest audit: tiny effort on a slice of Fashion-MNIST, no positive control.
SPEC = '{"effort": "tiny", "data": {"train_size": 600, "test_size": 200}, "controls": {"attacks": []}}'


def test_the_audit_page_shows_the_recovered_trigger_and_its_success_rate(portal, checkpoint, new_page):
    owner = portal.create_user("detective")
    token = portal.create_token(owner)
    with open(checkpoint, "rb") as model:
        created = requests.post(portal.url("/api/v1/audits"), headers={"Authorization": f"Bearer {token}"},
                                files={"model": model}, data={"spec": SPEC}, timeout=60)
    assert created.status_code == 202, created.text
    page = new_page()
    sign_in(page, portal, owner)
    page.goto(portal.url(f"/audits/{created.json()['id']}"))
    assert wait_status(page, ("succeeded", "failed", "cancelled"), AUDIT_TIMEOUT_S) == "succeeded"

    section = page.locator("#section-detection")
    section.wait_for(state="visible")
    assert section.locator("h2").inner_text() == "Trigger reverse-engineering"
    text = section.inner_text()
    assert "Suspected target class" in text and "Anomaly index" in text
    success = section.locator("tr", has_text="Recovered trigger's success").locator("td").nth(1).inner_text()
    assert re.fullmatch(r"\d+\.\d% \[\d+\.\d\u2013\d+\.\d\], n = \d+ held-out images of other classes", success), success
    summary = page.locator("#section-summary tr", has_text="Recovered trigger").inner_text()
    assert "anomaly index" in summary and "held-out images there" in summary
    picture = section.locator("figure img")
    assert picture.count() == 1 and "Recovered trigger" in picture.get_attribute("alt")
    wait_true(page, "[...document.querySelectorAll('#section-detection figure img')]"
                    ".every(img => img.complete && img.naturalWidth > 0)")
    assert page.locator("#section-images figure img[alt^='Recovered trigger']").count() == 0  # shown once
    section.scroll_into_view_if_needed()
    save_screenshot(page, "audit-recovered-trigger", full_page=False)
