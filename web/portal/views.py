"""Portal routes: parse the form or query, call the API's services, render a page.

Every audit route is owner-scoped through ``web.api.audits.service``: another user's
audit is a 404 here exactly as in the REST API. Views that the portal's script calls
(``status.json``, the panel fragment, the XHR submit and cancel) answer JSON or HTML
fragments; everything else renders a page or redirects (POST/redirect/GET), so the back
button and a reload never resubmit a form.
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)

from auditor.errors import AuditError, ErrorCode
from auditor.store.lifecycle import AuditStatus, is_terminal
from auditor.store.models import Audit
from web.api.audits import service as audits_service
from web.api.audits.routes import stream_artifact
from web.api.audits.schemas import REPORT_FORMATS, AuditDetail, PlanPreview
from web.api.tokens import service as tokens_service
from web.context import services
from web.errors import http_status
from web.portal import forms, progress
from web.portal.csrf import check_csrf, csrf_token
from web.portal.report_page import load_report_page
from web.portal.session_auth import (
    login_required,
    safe_next,
    sign_in,
    sign_out,
    signed_in_user,
    wants_json,
)

PAGE_SIZE = 20
STATUSES = [s.value for s in AuditStatus]
#: Submission errors that are the user's to fix in the form (the rest get an error page).
FORM_STATUSES = (400, 422)


#: Pages load nothing from elsewhere and run no inline script, so an injected tag does nothing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def register_routes(bp: Blueprint) -> None:
    bp.before_request(check_csrf)
    bp.after_request(_security_headers)
    bp.app_context_processor(_template_globals)
    bp.app_template_filter("when_text")(progress.when)  # a filter: imported macros see no context
    for rule, view, methods in ROUTES:
        bp.add_url_rule(rule, view_func=view, methods=methods)


def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")  # pages show live state and one-time secrets
    return response


def _template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "current_user": g.get("user"), "stage_label": progress.stage_label}


# --- sign-in -------------------------------------------------------------------------------


def index() -> Response:
    return redirect(url_for("portal.audits"))


def signin() -> Any:
    """Email and password of an account made with ``refine-audit user create``."""
    if request.method == "GET":
        if signed_in_user() is not None:
            return redirect(safe_next(request.args.get("next")))
        return render_template("portal/signin.html", email="", error=None, next=request.args.get("next", ""))
    email, password = request.form.get("email", ""), request.form.get("password", "")
    if sign_in(email, password) is None:
        error = "That email and password do not match an account."
        return render_template("portal/signin.html", email=email, error=error, next=request.form.get("next", "")), 401
    return redirect(safe_next(request.form.get("next")), 303)


def signout() -> Response:
    sign_out()
    flash("You have signed out.")
    return redirect(url_for("portal.signin"), 303)


# --- audits --------------------------------------------------------------------------------


@login_required
def audits() -> str:
    status = request.args.get("status") if request.args.get("status") in STATUSES else None
    page_number = max(_int_arg("page", 1), 1)
    page = audits_service.list_owned(g.user_id, status, PAGE_SIZE, (page_number - 1) * PAGE_SIZE)
    pages = max((page.total + PAGE_SIZE - 1) // PAGE_SIZE, 1)
    return render_template(
        "portal/audits.html", page=page, status=status, statuses=STATUSES, page_number=page_number, pages=pages,
        describe=progress.describe_audit, verdict_label=progress.verdict_label,
    )


@login_required
def new_audit() -> Any:
    if request.method == "GET":
        return _render_form(forms.AuditForm.defaults())
    form = forms.AuditForm.from_request(request.form)
    try:
        audit = _submit()
    except AuditError as exc:
        if http_status(exc.code) not in FORM_STATUSES:
            raise
        form.errors = forms.field_errors(exc)
        if wants_json():
            return jsonify(error={"code": exc.code.value, "message": exc.message, "fields": form.errors}), 422
        return _render_form(form, status=422)
    target = url_for("portal.audit", audit_id=audit.id)
    if wants_json():
        return jsonify(id=audit.id, redirect=target), 201
    return redirect(target, 303)


@login_required
def plan_preview() -> Any:
    """The plan of the new-audit form as filled in so far: a dry run through the API's own service.

    The form's script posts the fields (and a dataset, which sizes the plan) on every
    change, with the session's CSRF token; the checkpoint is left out, as a plan never
    needs the model.
    """
    try:
        submission = audits_service.Submission(forms.build_spec(request.form),
                                               forms.upload_files(request.files, request.form), dry_run=True)
        plan = audits_service.preview_audit(submission)
    except AuditError as exc:
        if http_status(exc.code) not in FORM_STATUSES:
            raise
        return jsonify(error={"code": exc.code.value, "message": exc.message, "fields": forms.field_errors(exc)}), 422
    return jsonify(PlanPreview.from_plan(plan).model_dump(mode="json"))


def _submit() -> Audit:
    """The form's spec and files through the very service ``POST /api/v1/audits`` uses.

    The hidden ``submission_id`` is the idempotency key, so a double click or a retried
    upload does not start the same audit twice.
    """
    spec = forms.build_spec(request.form)
    files = forms.upload_files(request.files, request.form)
    key = request.form.get("submission_id") or None
    audit, _created = audits_service.submit_audit(g.user_id, audits_service.Submission(spec, files, key))
    return audit


def _render_form(form: forms.AuditForm, status: int = 200) -> tuple[str, int]:
    html = render_template(
        "portal/new_audit.html", form=form, attacks=forms.attack_choices(), efforts=forms.EFFORTS,
        architectures=forms.ARCHITECTURES, protocols=forms.PROTOCOLS, outputs=forms.OUTPUTS,
        submission_id=request.form.get("submission_id") or secrets.token_urlsafe(16),
        max_upload_mb=services().settings.max_upload_mb,
    )
    return html, status


@login_required
def audit(audit_id: str) -> str:
    found = audits_service.get_owned(g.user_id, audit_id)
    return render_template("portal/audit.html", audit=found, **_panel_context(found))


@login_required
def audit_panel(audit_id: str) -> str:
    """The page's body alone, fetched by the script when an audit ends (no reload)."""
    found = audits_service.get_owned(g.user_id, audit_id)
    return render_template("portal/_audit_panel.html", audit=found, **_panel_context(found))


def _panel_context(found: Audit) -> dict[str, Any]:
    ended = is_terminal(AuditStatus(found.status))
    return {
        "ended": ended,
        "report": load_report_page(g.user_id, found.id) if ended else None,
        "describe": progress.describe_audit,
        "live": progress.live_view(found),
        "failure": progress.explain_failure(found),
        "formats": REPORT_FORMATS,
    }


@login_required
def audit_status(audit_id: str) -> Response:
    """What the live page polls: the API's own view of the audit plus display text."""
    found = audits_service.get_owned(g.user_id, audit_id)
    body = AuditDetail.from_row(found).model_dump(mode="json", exclude={"spec", "software"})
    return jsonify({**body, **progress.live_view(found)})


@login_required
def cancel_audit(audit_id: str) -> Any:
    """Queued: cancelled now; running: stops at its next batch; ended: nothing to do."""
    try:
        found = audits_service.cancel(g.user_id, audit_id)
    except AuditError as exc:
        if exc.code != ErrorCode.CONFLICT or wants_json():
            raise
        flash("This audit has already ended; there is nothing to cancel.")
        return redirect(url_for("portal.audit", audit_id=audit_id), 303)
    if wants_json():
        return jsonify(progress.live_view(found)), 202
    flash("Cancellation requested. A running audit stops after its current batch.")
    return redirect(url_for("portal.audit", audit_id=audit_id), 303)


@login_required
def download_report(audit_id: str, fmt: str) -> Response:
    if fmt not in REPORT_FORMATS:
        raise AuditError(ErrorCode.NOT_FOUND, "No such report format.")
    return stream_artifact(audits_service.report_of(g.user_id, audit_id, fmt), attachment=True)


@login_required
def download_artifact(audit_id: str, name: str) -> Response:
    """PNGs are shown inline in the page (``?inline=1``); everything else downloads."""
    artifact = audits_service.artifact_of(g.user_id, audit_id, name)
    inline = request.args.get("inline") == "1" and artifact.content_type == "image/png"
    return stream_artifact(artifact, attachment=not inline)


# --- tokens --------------------------------------------------------------------------------


@login_required
def tokens() -> Any:
    """List; POST creates one and shows its secret on this response only (never stored)."""
    created = None
    if request.method == "POST":
        name = request.form.get("name", "").strip()
        if not 1 <= len(name) <= 100:
            return _render_tokens(None, "Give the token a name of 1 to 100 characters."), 422
        token, plaintext = tokens_service.create(g.user_id, name)
        created = {"name": token.name, "token": plaintext, "webhook_secret": token.webhook_secret}
    return _render_tokens(created, None)


def _render_tokens(created: dict[str, str] | None, error: str | None) -> str:
    return render_template("portal/tokens.html", tokens=tokens_service.list_own(g.user_id), created=created, error=error)


@login_required
def revoke_token(token_id: int) -> Response:
    tokens_service.revoke(g.user_id, token_id)
    flash("The token was revoked; it no longer works.")
    return redirect(url_for("portal.tokens"), 303)


# --- helpers -------------------------------------------------------------------------------


def _int_arg(name: str, default: int) -> int:
    try:
        return int(request.args.get(name, default))
    except ValueError:
        return default


ROUTES: list[tuple[str, Any, list[str]]] = [
    ("/", index, ["GET"]),
    ("/signin", signin, ["GET", "POST"]),
    ("/signout", signout, ["POST"]),
    ("/audits", audits, ["GET"]),
    ("/audits/new", new_audit, ["GET", "POST"]),
    ("/audits/plan", plan_preview, ["POST"]),
    ("/audits/<audit_id>", audit, ["GET"]),
    ("/audits/<audit_id>/panel", audit_panel, ["GET"]),
    ("/audits/<audit_id>/status.json", audit_status, ["GET"]),
    ("/audits/<audit_id>/cancel", cancel_audit, ["POST"]),
    ("/audits/<audit_id>/report.<fmt>", download_report, ["GET"]),
    ("/audits/<audit_id>/files/<path:name>", download_artifact, ["GET"]),
    ("/tokens", tokens, ["GET", "POST"]),
    ("/tokens/<int:token_id>/revoke", revoke_token, ["POST"]),
]
