"""The hostile-checkpoint corpus through every way in: the REST API (the real web app), the
worker (the real executor on PostgreSQL and S3 with the sandboxed runner), the CLI, and the
loader inside the sandbox itself. Each file ends ``invalid_checkpoint`` and no payload runs.

Also: the web process never reaches a model loader -- every valid format is accepted with
every loader patched to fail, and the web sources name none.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from shared_fixtures import service_missing
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner
from sqlalchemy import delete

from api_support import TINY_SPEC, Api, api_factory, sqlite_api  # noqa: F401 (fixtures)
from hostile_corpus import CASES, _example, _TinyNet, build_corpus, pt2_pickled_constant_tensor, torchscript_tampered_data
from worker_support import FAST_OPTIONS, load, new_owner, sessions, settings_for, submit  # noqa: F401 (fixtures)

import auditor.models
import auditor.models.checkpoints
from auditor.cli import EXIT_INVALID_INPUT, main
from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.pipeline import AuditInputs
from auditor.sandbox import audit_runner, policy_from_settings, sandbox_problem
from auditor.sandbox.launcher import _rebuild_result, run_sandboxed
from auditor.settings import Settings
from auditor.spec import parse_spec
from auditor.store.artifacts import S3Credentials, S3Store
from auditor.store.db import session_scope
from auditor.store.models import User
from auditor.store.lifecycle import AuditStatus
from worker.executor import execute_audit

REPO = Path(__file__).resolve().parents[2]
NAMES = [case.name for case in CASES]



@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return {case.name: (path, marker) for case, path, marker in build_corpus(tmp_path_factory.mktemp("corpus"))}


@pytest.fixture
def settings(tmp_path: Path, pg_url: str, s3_store: S3Store, s3_endpoint: str, s3_credentials: S3Credentials) -> Settings:
    built = settings_for(tmp_path, pg_url, s3_store, s3_endpoint, s3_credentials)
    problem = sandbox_problem(policy_from_settings(built))
    if problem is not None:
        service_missing(f"the bubblewrap sandbox does not work here: {problem}", hint="scripts/bootstrap.sh installs bubblewrap")
    return built


@pytest.mark.parametrize("name", NAMES)
def test_hostile_checkpoint_over_rest_is_refused_and_never_enqueued(sqlite_api: Api, corpus, name: str) -> None:
    path, marker = corpus[name]
    response = sqlite_api.submit(sqlite_api.token(), path.read_bytes(), TINY_SPEC)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == "invalid_checkpoint"
    assert sqlite_api.queue.sent == []
    assert not marker.exists()


def test_hostile_checkpoints_through_the_worker_fail_with_invalid_checkpoint(settings: Settings, s3_store: S3Store,
                                                                              sessions, corpus) -> None:
    """Rows the web never checked (as if its check were bypassed): the worker's runner refuses them."""
    runner = audit_runner(settings, pytest.fail)
    owner = new_owner(sessions)
    try:
        for name in NAMES:
            path, marker = corpus[name]
            audit_id = submit(sessions, s3_store, owner, TINY_SPEC, path.read_bytes())
            execute_audit(audit_id, settings, store=s3_store, session_factory=sessions, options=FAST_OPTIONS,
                          runner=runner)
            row = load(sessions, audit_id)
            assert (row.status, row.error_code) == (AuditStatus.FAILED, "invalid_checkpoint"), name
            assert not marker.exists(), name
    finally:  # the store tests after this module expect the shared database without users
        with session_scope(sessions) as session:
            session.execute(delete(User).where(User.id == owner.user_id))


@pytest.mark.parametrize("name", NAMES)
def test_hostile_checkpoint_through_the_cli_exits_invalid_input(tmp_path: Path, corpus, name: str) -> None:
    path, marker = corpus[name]
    result = CliRunner().invoke(main, ["audit", str(path), "--out", str(tmp_path), "--effort", "tiny", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == EXIT_INVALID_INPUT, result.output
    assert "invalid_checkpoint" in result.output
    assert "UNSANDBOXED" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize("build", [pt2_pickled_constant_tensor, torchscript_tampered_data])
def test_the_loader_inside_the_sandbox_refuses_too(tmp_path: Path, settings: Settings, build) -> None:
    """Skip the parent's check: the child's loader refuses before any torch loader, and the payload,
    aimed at the one folder the sandbox may write, never creates its marker there."""
    work = tmp_path / "work"
    model = build(tmp_path, Path("/work/out/payload-ran"))
    outcome = run_sandboxed(parse_spec(TINY_SPEC), AuditInputs(work, model_path=model), policy_from_settings(settings))
    result = _rebuild_result(outcome, work / "out")
    assert (result.status, result.error["code"]) == ("failed", "invalid_checkpoint"), result.error
    assert "refused without being run" in result.error["message"]
    assert not (work / "out" / "payload-ran").exists()
    assert (work / "out" / "report.json").is_file()  # the pipeline's own failure report, written in the sandbox


LOADERS = [(torch, "load"), (torch.jit, "load"), (torch.export, "load"), (safetensors, "safe_open"),
           (safetensors.torch, "load_file"), (auditor.models.checkpoints, "load_checkpoint"),
           (auditor.models, "load_checkpoint")]


def valid_checkpoints(folder: Path) -> dict[str, bytes]:
    arch = ArchConfig("small_cnn", num_classes=10, width=4)
    model = build_classifier(arch).eval()
    files = {"safetensors": save_classifier(model, arch, folder / "m.safetensors"), "state_dict": folder / "sd.pt",
             "torchscript": folder / "m.pt", "export": folder / "m.pt2"}
    torch.save(model.state_dict(), files["state_dict"])
    torch.jit.save(torch.jit.script(_TinyNet().eval()), str(files["torchscript"]))
    torch.export.save(torch.export.export(_TinyNet().eval(), (_example(),)), str(files["export"]))
    return {fmt: path.read_bytes() for fmt, path in files.items()}


def test_submissions_of_every_valid_format_never_call_a_model_loader(sqlite_api: Api, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = valid_checkpoints(tmp_path)
    calls: list[str] = []

    def forbidden(name: str):
        def loader(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the web process called {name}")
        return loader

    for owner, attr in LOADERS:
        monkeypatch.setattr(owner, attr, forbidden(f"{owner.__name__}.{attr}"))
    token = sqlite_api.token()
    spec = {**TINY_SPEC, "model": {"architecture": {"name": "small_cnn", "width": 4}}}
    for fmt, data in checkpoints.items():
        response = sqlite_api.submit(token, data, spec)
        assert response.status_code == 202, (fmt, response.get_json())
    assert calls == []


def test_web_sources_name_no_model_loader() -> None:
    pattern = re.compile(r"\btorch\.load\b|\bjit\.load\b|\bexport\.load\b|\bsafe_open\b|\bload_file\b|"
                         r"\bload_checkpoint\b|\bpickle\.loads?\b|\bUnpickler\b|\bimport pickle\b")
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "web").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
