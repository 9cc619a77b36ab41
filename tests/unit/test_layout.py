"""The source layout's two rules, checked on the files rather than trusted to review.

``auditor/`` is the ML and domain core: outside ``auditor/store/`` no module imports a
web, queue or database library, so the core runs on a laptop with no services. And a
module over 400 lines says why at the top of its docstring, so size is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

AUDITOR = Path(__file__).resolve().parents[2] / "auditor"
ADAPTER_LIBRARIES = {"flask", "werkzeug", "celery", "kombu", "sqlalchemy", "alembic", "boto3", "botocore", "redis"}
MAX_LINES = 400


def _core_modules() -> list[Path]:
    return [path for path in sorted(AUDITOR.rglob("*.py")) if "store" not in path.relative_to(AUDITOR).parts[:1]]


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_core_imports_no_web_queue_or_database_library_outside_store() -> None:
    offenders = {str(path.relative_to(AUDITOR)): sorted(_imported_roots(path) & ADAPTER_LIBRARIES)
                 for path in _core_modules()}
    assert {name: libs for name, libs in offenders.items() if libs} == {}


def test_a_module_over_400_lines_says_why_at_its_top() -> None:
    unexplained = []
    for path in sorted(AUDITOR.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "(Over 400 lines:" not in text[:600]:
            unexplained.append(str(path.relative_to(AUDITOR)))
    assert unexplained == []
