"""Shared bits of the benchmarks: provenance and result writing."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=RESULTS.parent)
        # A benchmark's own output files are not a change to the code it measured.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(top,exclude)bench/results"],
                               capture_output=True, text=True, cwd=RESULTS.parent)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device, module: str) -> dict[str, Any]:
    """Where a figure came from: machine, software, commit and the exact command."""
    return {
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "git_commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", module, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


#: The /proc/cpuinfo flags a timing depends on: native bf16 (or AMX) roughly doubles REFINE's speed.
TIMING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """This CPU's flags, from /proc/cpuinfo (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("flags"):
            return sorted(line.split(":", 1)[1].split())
    return []


def cpu_features() -> list[str]:
    """Which of TIMING_FLAGS this CPU has: timings from machines with other flags are not comparable."""
    flags = set(cpu_flags())
    return [f for f in TIMING_FLAGS if f in flags]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def finished_parts(parts: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Entries saved beside a benchmark's output by runs with this exact configuration, by file stem.

    Benchmarks run as parallel processes each save their finished pieces there;
    whichever process ends last combines them, skipping pieces of other configurations.
    """
    same = json.loads(json.dumps(config))
    entries = {}
    for path in sorted(parts.glob("*.json")):
        saved = json.loads(path.read_text())
        if saved["config"] == same:
            entries[path.stem] = saved["entry"]
    return entries


def ended_otherwise(entry: dict[str, Any], *cells: str) -> str | None:
    """A table row for a run that did not succeed (e.g. a plan refused for its budget), else None."""
    if entry["status"] == "succeeded":
        return None
    return f"| {' | '.join(cells)} | {entry['status']}: {(entry['error'] or {}).get('code')} |"
