"""Sign-in, sessions, CSRF and API tokens through the portal in a real browser."""

from __future__ import annotations

import pytest
from e2e.portal_support import (
    PASSWORD,
    Portal,
    browser,
    console,
    new_page,
    portal,
    save_screenshot,
    sign_in,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def user(portal: Portal) -> str:
    return portal.create_user("security")


def test_pages_need_a_signed_in_session_and_sign_out_ends_it(portal, user, new_page, console):
    console.allow(401)  # the wrong password, on purpose
    page = new_page()
    page.goto(portal.url("/audits"))
    assert "/signin" in page.url
    page.get_by_label("Email").fill(user)
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "That email and password do not match an account."
    save_screenshot(page, "sign-in", full_page=False)

    sign_in(page, portal, user, PASSWORD)
    cookie = next(c for c in page.context.cookies() if c["name"] == "refine_audit_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/signin")
    page.goto(portal.url("/tokens"))
    assert "/signin" in page.url


def test_a_post_without_the_sessions_csrf_token_is_refused(portal, user, new_page):
    page = new_page()
    sign_in(page, portal, user)
    page.goto(portal.url("/tokens"))
    good = page.locator('meta[name="csrf-token"]').get_attribute("content")

    # page.request shares the context's cookies: a forged request rides on the real session.
    for form in ({"name": "forged"}, {"name": "forged", "csrf_token": "not-the-token"}):
        response = page.request.post(portal.url("/tokens"), form=form, max_redirects=0)
        assert response.status in (400, 403), form
    response = page.request.post(portal.url("/signout"), headers={"X-CSRF-Token": "wrong"}, max_redirects=0)
    assert response.status in (400, 403)

    response = page.request.post(portal.url("/tokens"), form={"name": "genuine", "csrf_token": good})
    assert response.status == 200
    page.reload()
    names = page.locator("#token-table tbody td:first-child").all_inner_texts()
    assert "genuine" in names and "forged" not in names


def test_a_token_is_shown_once_and_can_be_revoked(portal, user, new_page):
    page = new_page()
    sign_in(page, portal, user)
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("ci-pipeline")
    page.get_by_role("button", name="Create token").click()
    secret = page.get_by_label("New API token").input_value()
    assert secret.startswith("ra_")
    save_screenshot(page, "tokens")

    response = page.request.get(portal.url("/api/v1/tokens"), headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 200

    page.goto(portal.url("/tokens"))
    assert secret not in page.content(), "the secret must not be shown a second time"
    page.once("dialog", lambda dialog: dialog.accept())
    row = page.locator("#token-table tbody tr", has_text="ci-pipeline")
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_load_state()
    assert row.locator(".badge").inner_text() == "Revoked"
    response = page.request.get(portal.url("/api/v1/tokens"), headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 401
