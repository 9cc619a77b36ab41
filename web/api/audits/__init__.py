"""Audits: submit, follow, cancel, delete, and download reports and artifacts."""
