"""Submitted models run only in a sandbox: a bubblewrap child process per audit.

``audit_runner(settings, warn)`` picks the runner a process hands to the executor or
calls itself (``run_audit_sandboxed`` when bubblewrap works, ``run_audit`` otherwise,
refused in production without the operator's consent). Pure Python: no web, queue or
database library, and importing it loads no torch.
"""

from auditor.sandbox.policy import (
    SandboxPolicy,
    SandboxUnavailable,
    audit_runner,
    policy_from_settings,
    require_sandbox_or_consent,
    sandbox_policy,
    sandbox_problem,
)

__all__ = [
    "SandboxPolicy",
    "SandboxUnavailable",
    "audit_runner",
    "policy_from_settings",
    "require_sandbox_or_consent",
    "sandbox_policy",
    "sandbox_problem",
]
