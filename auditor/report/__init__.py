"""The audit report: the report.json contract, plots, and HTML/PDF rendering."""

from auditor.report.render import rerender, write_report
from auditor.report.schema import SCHEMA_VERSION, Report, ReportValidationError, report_json_schema, validate_report

__all__ = [
    "SCHEMA_VERSION",
    "Report",
    "ReportValidationError",
    "report_json_schema",
    "rerender",
    "validate_report",
    "write_report",
]
