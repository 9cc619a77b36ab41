"""``python -m auditor.report``: regenerate docs/report.schema.json after changing the schema."""

from auditor.report.schema import write_json_schema

print(write_json_schema())
