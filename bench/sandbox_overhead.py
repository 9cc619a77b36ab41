"""What the sandbox costs: start-up, and one tiny audit sandboxed vs in-process, in one run.

    .venv/bin/python -m bench.sandbox_overhead [--repeats 3]

* **start-up**: the trial sandbox (``bwrap`` + ``prlimit`` + a Python that exits), and a
  sandboxed Python that imports ``auditor.pipeline`` (torch and the rest), against the
  same import outside the sandbox;
* **tiny audit**: the same spec on the same checkpoint through ``run_audit`` in this
  process and through ``run_audit_sandboxed`` (what the worker and CLI run), alternated.

Writes ``bench/results/sandbox_overhead.json`` (medians and every run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, provenance, write_json

from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.pipeline import AuditInputs, run_audit
from auditor.runtime import resolve_device
from auditor.sandbox import policy_from_settings
from auditor.sandbox.launcher import _Layout, bwrap_argv, run_audit_sandboxed, trial_argv
from auditor.settings import Settings
from auditor.spec import parse_spec

SPEC = {"effort": "tiny", "data": {"train_size": 200, "test_size": 100}, "controls": {"attacks": []}, "probes": {"images": 20}}
IMPORT = [sys.executable, "-c", "import auditor.pipeline"]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    policy = policy_from_settings(Settings.from_env())
    runs: dict[str, list[float]] = {k: [] for k in ("trial_sandbox", "import_sandboxed", "import_plain",
                                                    "audit_sandboxed", "audit_in_process")}
    spec = parse_spec(SPEC)
    with tempfile.TemporaryDirectory(prefix="sandbox-overhead-") as tmp:
        arch = ArchConfig("small_cnn", width=4)
        model = save_classifier(build_classifier(arch), arch, Path(tmp) / "model.safetensors")
        for i in range(args.repeats):
            runs["trial_sandbox"].append(timed(lambda: subprocess.run(trial_argv(policy), check=True)))
            runs["import_sandboxed"].append(timed(lambda: subprocess.run(bwrap_argv(policy, _Layout(), IMPORT), check=True)))
            runs["import_plain"].append(timed(lambda: subprocess.run(IMPORT, check=True)))
            for name, runner in (("audit_sandboxed", lambda s, a: run_audit_sandboxed(s, a, policy=policy)),
                                 ("audit_in_process", run_audit)):
                inputs = AuditInputs(Path(tmp) / f"{name}-{i}", model_path=model, device="cpu")
                result = None

                def once() -> None:
                    nonlocal result
                    result = runner(spec, inputs)

                runs[name].append(timed(once))
                assert result.status == "succeeded", result.error
            print({k: round(v[-1], 2) for k, v in runs.items()}, flush=True)
    medians = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    write_json(RESULTS / "sandbox_overhead.json", {
        "median_seconds": medians,
        "audit_overhead_seconds": round(medians["audit_sandboxed"] - medians["audit_in_process"], 2),
        "runs_seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "spec": SPEC,
        "load_average_at_end": list(os.getloadavg()),
        **provenance(resolve_device("cpu"), "bench.sandbox_overhead"),
    })
    print(medians)


if __name__ == "__main__":
    main()
