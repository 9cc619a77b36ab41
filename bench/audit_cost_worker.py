"""One audit, timed per stage, in its own process: what ``bench/audit_cost.py`` runs for each code version.

    PYTHONPATH=<tree> python bench/audit_cost_worker.py job.json result.json

It imports nothing but ``auditor`` (from whichever tree is first on PYTHONPATH) and only
what every version since 45d0dbd has: ``run_audit``, ``AuditInputs`` and ``parse_spec``.
Each stage's wall and CPU time (this process, every thread, plus waited-for children)
is taken where the pipeline announces the stage (``on_progress(stage, 0, 1)``), so the
baseline and the new code are timed by the same rule.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import auditor
from auditor.pipeline import AuditInputs, run_audit
from auditor.spec import parse_spec

STAGES = ("data", "load", "surrogate", "detect", "refine", "evaluate", "report")


def cpu_seconds() -> float:
    """CPU of this process (all threads) and of its children that ended (a sandbox, a subprocess)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class StageClock:
    """Wall and CPU seconds per stage, split where the pipeline starts each one."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._mark = (time.perf_counter(), cpu_seconds())

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage in STAGES and stage != self.stage:
            self.close()
            self.stage = stage

    def close(self) -> None:
        now = (time.perf_counter(), cpu_seconds())
        if self.stage is not None:
            self.wall[self.stage] = self.wall.get(self.stage, 0.0) + now[0] - self._mark[0]
            self.cpu[self.stage] = self.cpu.get(self.stage, 0.0) + now[1] - self._mark[1]
        self._mark = now


def inputs(job: dict[str, Any]) -> AuditInputs:
    """The job's inputs, keeping only the fields this version's AuditInputs has (the baseline has no cache)."""
    known = {f.name for f in dataclasses.fields(AuditInputs)}
    values = {"work_dir": Path(job["work_dir"]), "model_path": job.get("model_path") and Path(job["model_path"]),
              "allowed_hosts": tuple(job.get("allowed_hosts", ())), "device": "cpu",
              "control_cache": job.get("control_cache") and Path(job["control_cache"])}
    return AuditInputs(**{k: v for k, v in values.items() if k in known})


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the cost table needs from the report: BA before/after, the controls and how they were obtained."""
    utility = report.get("utility") or {}
    controls = [{"attack": c.get("attack"), "origin": c.get("origin", "trained"),
                 "steps": (c.get("training") or {}).get("steps"), "train_seconds": c.get("train_seconds"),
                 "asr_before": (c.get("no_defense") or {}).get("asr"), "asr_after": (c.get("refine") or {}).get("asr")}
                for c in report.get("positive_controls") or []]
    return {"ba_before": utility.get("ba_before"), "ba_after": utility.get("ba_after"), "controls": controls,
            "plan": report.get("plan"), "verdict": (report.get("verdict") or {}).get("level"),
            "refine_seconds": (report.get("refine") or {}).get("seconds"),
            "schema_version": report.get("schema_version")}


def main(job_file: str, result_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    clock = StageClock()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = run_audit(parse_spec(job["spec"]), inputs(job), on_progress=clock)
    clock.close()
    out = {"status": result.status, "error": result.error and {k: result.error.get(k) for k in ("code", "message")},
           "wall_s": time.perf_counter() - started, "cpu_s": cpu_seconds() - cpu_started,
           "stages_wall": clock.wall, "stages_cpu": clock.cpu, "out_dir": str(result.out_dir),
           "auditor": str(Path(auditor.__file__).parent), **summary(result.report or {})}
    Path(result_file).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
