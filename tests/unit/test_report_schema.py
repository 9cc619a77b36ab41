"""report.json contract: the sample validates, broken reports are rejected by pydantic and the JSON Schema."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from report_sample import sample_report

from auditor.report.schema import DOCS_SCHEMA_PATH, ReportValidationError, report_json_schema, validate_report


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = report_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("source", ["checkpoint", "api"])
def test_sample_report_validates(source: str, validator: jsonschema.Draft202012Validator) -> None:
    report = sample_report(source)
    validator.validate(report)
    parsed = validate_report(report)
    assert parsed.is_api_audit == (source == "api")
    validator.validate(json.loads(parsed.model_dump_json()))  # what write_report writes is valid too


def test_docs_schema_is_current() -> None:
    assert DOCS_SCHEMA_PATH.is_file(), "run: python -m auditor.report"
    on_disk = json.loads(DOCS_SCHEMA_PATH.read_text(encoding="utf-8"))
    assert on_disk == report_json_schema(), "docs/report.schema.json is stale; run: python -m auditor.report"


def _broken(edit) -> dict:
    report = copy.deepcopy(sample_report())
    edit(report)
    return report


def _set_asr(r: dict) -> None:
    r["positive_controls"][1]["refine"]["asr"] = 1.7


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_asr, "positive_controls.1.refine.asr"),
        (lambda r: r.pop("verdict"), "verdict"),
        (lambda r: r["verdict"].update(level="guilty"), "verdict.level"),
        (lambda r: r.update(surprise=1), "surprise"),
        (lambda r: r["utility"].update(ba_after=float("nan")), "utility.ba_after"),
    ],
    ids=["asr-above-1", "missing-verdict", "unknown-level", "unknown-key", "nan"],
)
def test_invalid_reports_are_rejected_by_both(edit, message: str, validator: jsonschema.Draft202012Validator) -> None:
    report = _broken(edit)
    with pytest.raises(ReportValidationError, match=message.replace(".", r"\.")):
        validate_report(report)
    if message != "utility.ba_after":  # NaN is not JSON, so the JSON Schema never sees it
        assert list(validator.iter_errors(report))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["refine"].update(mapping=list(range(10))), "derangement"),
        (lambda r: r["refine"].update(mapping=[1, 2, 0]), "refine.mapping has 3 entries"),
        (lambda r: r["utility"]["per_class_accuracy_after"].pop(), "per_class_accuracy_after has 9"),
        (lambda r: r["probes"]["before"].update(suspected_target=12), "not a class index"),
        (lambda r: r["inputs"]["model"].update(sha256=None), "sha256"),
        (lambda r: r["inputs"]["data"].update(num_classes=9), "class_names has 10"),
        (lambda r: r.update(images=[{"file": "../etc/passwd.png"}]), "images.0.file"),
    ],
    ids=["identity-mapping", "short-mapping", "per-class-length", "bad-class", "no-hash", "names", "path"],
)
def test_cross_field_rules(edit, message: str) -> None:
    with pytest.raises(ReportValidationError, match=message):
        validate_report(_broken(edit))


def test_failed_report_needs_error_not_results(validator: jsonschema.Draft202012Validator) -> None:
    report = sample_report()
    for key in ("verdict", "timings", "refine", "utility", "probes"):
        report[key] = None
    report.update(status="failed", positive_controls=[])
    with pytest.raises(ReportValidationError, match="needs error"):
        validate_report(report)
    assert list(validator.iter_errors(report))
    report["error"] = {"code": "invalid_checkpoint", "message": "Not a TorchScript archive."}
    validator.validate(report)
    assert validate_report(report).verdict is None
