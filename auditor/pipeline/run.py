"""``run_audit``: one audit from submitted inputs to a report and artifacts.

    data (+ plan) -> load -> surrogate (API models only) -> detect -> refine -> evaluate -> report

Each stage reports progress, can be cancelled between batches and fails with a
stable error code. The function takes plain inputs and callbacks, so the CLI, the
Celery worker and the in-process server all call it the same way.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from auditor.errors import AuditCancelled, AuditError, ErrorCode
from auditor.pipeline.data import stage_data
from auditor.pipeline.detect import stage_detect
from auditor.pipeline.evaluate import stage_evaluate
from auditor.pipeline.load import stage_load
from auditor.pipeline.refine import stage_refine
from auditor.pipeline.report import summary, write_outputs
from auditor.pipeline.state import AuditInputs, AuditResult, AuditState, MetricsFn
from auditor.pipeline.surrogate import stage_surrogate
from auditor.runtime import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress, resolve_device, seed_everything
from auditor.spec import AuditSpec

log = logging.getLogger(__name__)

Stage = Callable[[AuditState, ProgressFn, CancelFn, "MetricsFn | None"], None]

#: Each stage with the callbacks it uses; the plan (made by ``data``) decides which of them run.
STAGE_FUNCTIONS: dict[str, Stage] = {
    "data": lambda state, progress, cancel, metrics: stage_data(state),
    "load": lambda state, progress, cancel, metrics: stage_load(state),
    "surrogate": lambda state, progress, cancel, metrics: stage_surrogate(state, progress, cancel),
    "detect": lambda state, progress, cancel, metrics: stage_detect(state, progress, cancel),
    "refine": stage_refine,
    "evaluate": stage_evaluate,
}


def run_audit(
    spec: AuditSpec,
    inputs: AuditInputs,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    on_metrics: MetricsFn | None = None,
) -> AuditResult:
    """Run every stage; domain errors and cancellation end in a result, unexpected errors propagate."""
    if inputs.only_control is not None:
        return run_control_part(spec, inputs, on_progress, should_cancel, on_metrics)
    started = time.perf_counter()
    state = _new_state(spec, inputs)
    with _audit_log(state.out / "audit.log"):
        try:
            for stage in _stages(state):
                with _timed(state, stage):
                    on_progress(stage, 0, 1)
                    check_cancel(should_cancel)
                    STAGE_FUNCTIONS[stage](state, on_progress, should_cancel, on_metrics)
                    on_progress(stage, 1, 1)
        except AuditCancelled as exc:
            return _ended(state, "cancelled", exc, started)
        except AuditError as exc:
            log.warning("audit failed: %s %s", exc.code.value, exc.message)
            return _ended(state, "failed", exc, started)
        finally:
            if state.api is not None:
                state.api.close()
    state.timings["total"] = time.perf_counter() - started
    return _succeeded(state)


def run_control_part(
    spec: AuditSpec,
    inputs: AuditInputs,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    on_metrics: MetricsFn | None = None,
) -> AuditResult:
    """One positive control of a split audit, alone: its entries land in ``inputs.control_cache``.

    A control depends on the data, the attack, the control settings, the seed and the
    *family* of the submitted model (``controls.run_control``), so the part runs the
    cheap ``data`` and ``load`` stages too -- loading is how the family is known -- and
    then trains and defends that one control. Its result is the cache entries; the
    audit's main run reuses them (re-scoring the control on its own test images), so
    the report is the same as if the main run had trained it. No report is written.
    """
    from auditor.pipeline.controls import run_control

    state = _new_state(spec, inputs)
    out = state.out
    name = inputs.only_control
    try:
        for stage in ("data", "load"):
            on_progress(stage, 0, 1)
            check_cancel(should_cancel)
            STAGE_FUNCTIONS[stage](state, on_progress, should_cancel, on_metrics)
        if inputs.control_cache is None or name not in state.plan.controls.attacks:
            raise AuditError(ErrorCode.INVALID_SPEC, f"The audit plans no cacheable positive control {name!r}.")
        on_progress("evaluate", 0, 1)
        entry = run_control(state, name, should_cancel, on_metrics)
        if entry["cache"] is None:
            raise AuditError(ErrorCode.INVALID_SPEC, f"The positive control {name!r} cannot be cached for its audit.")
        on_progress("evaluate", 1, 1)
    except AuditCancelled as exc:
        return AuditResult("cancelled", out, None, {"status": "cancelled"}, [], _error_of(exc))
    except AuditError as exc:
        log.warning("control %s failed: %s %s", name, exc.code.value, exc.message)
        return AuditResult("failed", out, None, {"status": "failed"}, [], _error_of(exc))
    finally:
        if state.api is not None:
            state.api.close()
    return AuditResult("succeeded", out, None, {"status": "succeeded", "control": name}, [])


def _new_state(spec: AuditSpec, inputs: AuditInputs) -> AuditState:
    """The output folder, the seeds and the state: a whole audit and one control part start alike."""
    out = Path(inputs.work_dir) / "out"
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    return AuditState(spec, inputs, out, resolve_device(inputs.device))


def _error_of(exc: AuditError) -> dict:
    return {"code": exc.code.value, "message": exc.message, "detail": exc.detail}


def _stages(state: AuditState) -> Iterator[str]:
    """``data`` first (it makes the plan), then the plan's stages; ``report`` is written by the caller."""
    yield "data"
    yield from (s for s in state.plan.stages if s not in ("data", "report"))


@contextmanager
def _timed(state: AuditState, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    log.info("stage %s started", stage)
    try:
        yield
    finally:
        state.timings[stage] = time.perf_counter() - started


@contextmanager
def _audit_log(path: Path) -> Iterator[None]:
    """Everything auditor.* logs during the run goes to audit.log, an artifact users can read."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("auditor")
    previous = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def _write(state: AuditState, status: str, error: AuditError | None) -> dict:
    with _timed(state, "report"):
        return write_outputs(state, status, error)


def _succeeded(state: AuditState) -> AuditResult:
    report = _write(state, "succeeded", None)
    return AuditResult("succeeded", state.out, report, summary(report), state.artifacts)


def _ended(state: AuditState, status: str, exc: AuditError, started: float) -> AuditResult:
    """A failed or cancelled audit still leaves a report saying what happened and why."""
    state.timings["total"] = time.perf_counter() - started
    error = _error_of(exc)
    try:
        report = _write(state, status, exc)
    except Exception:  # the report of a failure must not hide the failure itself
        log.exception("could not write the report of a %s audit", status)
        report = None
    return AuditResult(status, state.out, report, summary(report) if report else {"status": status},
                       state.artifacts, error)
