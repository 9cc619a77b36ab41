"""Fixtures for the browser tests: a real ``refine-audit serve`` and Debian's headless Chromium.

The server is the embedded mode a user runs (SQLite, a local artifact folder, audits on an
in-process queue), started as a subprocess on a free loopback port; accounts are made with
the operator command ``refine-audit user create``. Playwright drives the system Chromium at
``/usr/bin/chromium`` (never a downloaded browser). A missing Chromium skips these tests on
a developer machine and fails them under CI (``CI=true``), where a skip would hide a broken
set-up. Every page records console errors and uncaught exceptions; a test fails if any
appear, because a portal that logs errors is broken even when the assertions pass.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e.processes import (
    BIN,
    REPO,
    ServiceProcess,
    answers_ok,
    free_port,
    service_env,
    start_process,
    wait_for,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 860}
PASSWORD = "correct horse battery"
#: The smoke-test spec of the brief: one small positive control on a slice of Fashion-MNIST.
TINY_FORM = {"effort": "tiny", "train_size": "600", "test_size": "200", "attacks": ["badnets"]}


def browser_missing(message: str) -> None:
    """As tests/conftest.py: fail under CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)




def screenshot_dir() -> Path:
    """Where screenshots go as artifacts of the run (``REFINE_AUDIT_SCREENSHOTS``)."""
    folder = Path(os.environ.get("REFINE_AUDIT_SCREENSHOTS", REPO / "out" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Portal:
    """A running server, its accounts and a way to make more of them."""

    base_url: str
    env: dict[str, str]
    process: ServiceProcess
    emails: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path

    def create_user(self, name: str) -> str:
        """An account made the way an operator makes one."""
        email = f"{name}-{secrets.token_hex(3)}@example.com"
        done = subprocess.run(
            [str(BIN / "refine-audit"), "user", "create", "--email", email, "--password", PASSWORD],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, f"user create exited {done.returncode}: {done.stderr[-2000:]}"  # say why
        self.emails.append(email)
        return email

    def create_token(self, email: str) -> str:
        done = subprocess.run(
            [str(BIN / "refine-audit"), "token", "create", "--email", email], env=self.env, cwd=REPO,
            check=True, capture_output=True, text=True, timeout=120,
        )
        return done.stdout.strip()


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    """``refine-audit serve`` on a free port with its own data dir; stopped after the module."""
    data_dir = tmp_path_factory.mktemp("portal")
    port = free_port()
    env = service_env({
        "REFINE_AUDIT_ENV": "test",
        "REFINE_AUDIT_DATA_DIR": str(data_dir),
        "REFINE_AUDIT_SECRET_KEY": secrets.token_hex(32),
        "REFINE_AUDIT_ALLOWED_HOSTS": "127.0.0.1",
        "REFINE_AUDIT_DEVICE": "cpu",
        "REFINE_AUDIT_MAX_UPLOAD_MB": "64",
    })
    process = start_process(
        "refine-audit-serve", [str(BIN / "refine-audit"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env, data_dir / "serve.log",
    )
    portal = Portal(f"http://127.0.0.1:{port}", env, process)
    try:
        wait_for(lambda: answers_ok(portal.url("/signin")), 120, message="the portal to answer", process=process)
        yield portal
    finally:
        process.stop()




@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        browser_missing(f"{CHROMIUM} is missing: run scripts/bootstrap.sh as root (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


#: How Chromium logs a response with an error status (not a script error).
HTTP_STATUS_LOG = "Failed to load resource: the server responded with a status of {status} "


@dataclass
class ConsoleLog:
    """Console errors and uncaught exceptions of a test's pages.

    Chromium also logs every 4xx response as a console error. A test that provokes one
    on purpose (a wrong password, someone else's audit) says so with ``allow(status)``;
    any other error still fails it.
    """

    errors: list[str] = field(default_factory=list)
    allowed_statuses: set[int] = field(default_factory=set)

    def allow(self, status: int) -> None:
        self.allowed_statuses.add(status)

    def record(self, text: str) -> None:
        if not any(text.startswith(HTTP_STATUS_LOG.format(status=s)) for s in self.allowed_statuses):
            self.errors.append(text)


@pytest.fixture
def console() -> ConsoleLog:
    return ConsoleLog()


@pytest.fixture
def new_page(browser, console: ConsoleLog):
    """``new_page()`` -> a page in a fresh context (its own cookies); console errors fail the test."""
    contexts, log = [], console

    def make():
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("console", lambda msg: log.record(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: log.errors.append(f"uncaught exception: {exc} @ {page.url}"))
        return page

    yield make
    for context in contexts:
        context.close()
    assert log.errors == [], "the browser logged errors:\n" + "\n".join(log.errors)


def sign_in(page, portal: Portal, email: str, password: str = PASSWORD) -> None:
    page.goto(portal.url("/signin"))
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/audits")


def fill_checkpoint_form(page, checkpoint: Path, **overrides: object) -> None:
    """The new-audit form for a checkpoint on Fashion-MNIST with the tiny smoke-test settings."""
    values = {**TINY_FORM, **overrides}
    page.get_by_label("Upload a checkpoint").check()
    page.get_by_label("Checkpoint file").set_input_files(str(checkpoint))
    page.get_by_label("Effort level").select_option(str(values["effort"]))
    page.get_by_label("Training images").fill(str(values["train_size"]))
    page.get_by_label("Test images").fill(str(values["test_size"]))
    if values.get("epochs"):
        page.get_by_label("REFINE epochs").fill(str(values["epochs"]))
    for box in page.locator('input[name="attacks"]').all():
        box.set_checked(box.get_attribute("value") in values["attacks"])


def status_badge(page):
    return page.locator("#audit-status .badge")


def save_screenshot(page, name: str, *, full_page: bool = True, max_height: int | None = None) -> Path:
    """A PNG in ``screenshot_dir()``; ``max_height`` keeps the top of a long page only."""
    path = screenshot_dir() / f"{name}.png"
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": max_height} if max_height else None
    page.screenshot(path=str(path), full_page=full_page, clip=clip)
    return path


def wait_status(page, statuses: tuple[str, ...], timeout_s: float) -> str:
    """Wait, without reloading, until the live badge shows one of ``statuses``."""
    selector = ", ".join(f'#audit-status .badge[data-status="{s}"]' for s in statuses)
    page.wait_for_selector(selector, timeout=timeout_s * 1000)
    return status_badge(page).get_attribute("data-status")


def wait_true(page, expression: str, timeout_s: float = 15.0) -> None:
    """Poll a JS expression from Python. ``page.wait_for_function`` evaluates its predicate
    with ``new Function`` inside the page, which the portal's CSP (no unsafe-eval) forbids."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for: {expression}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained for one epoch on 3,000 Fashion-MNIST images (a couple of seconds),
    as self-describing safetensors: a model with real accuracy makes a report worth reading."""
    import torch

    from auditor.data import load_fashion_mnist, take
    from auditor.models import ArchConfig, build_classifier, save_classifier
    from auditor.training import TrainConfig, train_classifier

    train, _ = load_fashion_mnist(cache_dir=tmp_path_factory.mktemp("cache"))
    subset = take(train, 3000, seed=0)
    torch.manual_seed(0)
    arch = ArchConfig("small_cnn", num_classes=10, width=8)
    model = build_classifier(arch)
    train_classifier(model, subset.x, subset.y, TrainConfig(epochs=1, batch_size=64), device=torch.device("cpu"), seed=0)
    path = tmp_path_factory.mktemp("checkpoint") / "classifier.safetensors"
    save_classifier(model, arch, path)
    return path


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.1f} s"
