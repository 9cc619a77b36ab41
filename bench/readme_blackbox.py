"""The README's black-box example, run as written, at full size: is the audit sound at the default effort?

    OMP_NUM_THREADS=2 python -m bench.readme_blackbox          # ~40 min cold on a quiet 2-core CPU

Runs the README's own commands with the installed ``refine-audit``: ``attack badnets``
(its defaults), ``serve-model … --labels-only``, then ``audit --api … --output labels
--query-budget 30000 --allow-host 127.0.0.1`` at the default effort, with a fresh data
folder, so the positive-control cache is as cold as a first user's. ``--out`` is the one
argument added, to keep the run's files together. The audit's figures come from its
report; the served model's own trigger is then scored through M ∘ API ∘ T on the whole
Fashion-MNIST test set, with the T and M the audit wrote and a client of our own (outside
the audit's budget). The file records the three promises of the sound-audits issue:
surrogate agreement ≥ 95% on clean test images, defended BA within 3 points of the API's,
ASR ≤ 5% on the served model's trigger.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import torch

from auditor.attacks.base import load_attack
from auditor.blackbox import ApiConfig, HttpModelAPI
from auditor.blackbox.defended import api_predictor, defended_api_predictor
from auditor.data import load_fashion_mnist
from auditor.deploy.defense import load_defense
from auditor.evaluation import attack_metrics
from auditor.settings import Settings
from bench.common import RESULTS, git_commit, provenance, write_json

REFINE_AUDIT = Path(sys.executable).parent / "refine-audit"
BUDGET = 30_000
PROMISES = {"agreement_clean_min": 0.95, "ba_drop_max": 0.03, "asr_after_max": 0.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/readme_blackbox"))
    p.add_argument("--keep-model", action="store_true", help="reuse models/badnets from an earlier run")
    p.add_argument("--smoke", action="store_true",
                   help="check this script in minutes: 1-epoch model, --effort tiny --test-size 600 (not the README run)")
    p.add_argument("--out", type=Path, default=RESULTS / "readme_blackbox.json")
    return p.parse_args(argv)


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    """One README command, its output kept beside the run; fails loudly, as a user would see it."""
    started = time.perf_counter()
    with log.open("w") as sink:
        subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, check=True)
    return round(time.perf_counter() - started, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if server.poll() is not None:
            raise RuntimeError("serve-model exited before it was ready")
        time.sleep(0.3)
    raise RuntimeError("serve-model did not come up")


def served_trigger(url: str, out_dir: Path, model_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """BA and the planted trigger's ASR through the API, raw and through M ∘ API ∘ T, on the whole test set."""
    attack = load_attack(model_dir)
    _, test = load_fashion_mnist(Settings.from_env().fmnist_dir, Path(env["REFINE_AUDIT_DATA_DIR"]))
    triggered = attack.triggered_test(test)
    defense = load_defense(out_dir)
    config = ApiConfig(url=url, num_classes=10, output="labels", query_budget=None, batch_size=256)
    with HttpModelAPI(config, allowed_hosts=("127.0.0.1",)) as client:
        raw = attack_metrics(api_predictor(client), test, triggered, attack.config.target)
        defended = attack_metrics(defended_api_predictor(client, defense.transform, defense.mapping,
                                                         torch.device("cpu")), test, triggered, attack.config.target)
    return {"test_images": len(test), "before": {"ba": raw.ba, "asr": raw.asr},
            "after": {"ba": defended.ba, "asr": defended.asr}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir
    data_dir, model_dir, out_dir = work / "data", work / "models" / "badnets", work / "out" / "audit"
    if not args.keep_model:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)  # a first user's cold control cache
    shutil.rmtree(out_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REFINE_AUDIT_DATA_DIR": str(data_dir)}
    seconds: dict[str, float] = {}
    if not (model_dir / "model.pt").exists():
        epochs = ["--epochs", "1"] if args.smoke else []
        seconds["attack"] = timed([str(REFINE_AUDIT), "attack", "badnets", "--out", str(model_dir), *epochs], env,
                                  work / "attack.log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(REFINE_AUDIT), "serve-model", str(model_dir / "model.pt"), "--port", str(port),
                               "--labels-only"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    audit = [str(REFINE_AUDIT), "audit", "--api", f"{url}/v1/models/model:predict", "--output", "labels",
             "--query-budget", str(BUDGET), "--allow-host", "127.0.0.1", "--out", str(out_dir)]
    audit += ["--effort", "tiny", "--test-size", "600"] if args.smoke else []
    try:
        wait_ready(url, server)
        seconds["audit"] = timed(audit, env, work / "audit.log")
        report = json.loads((out_dir / "out" / "report.json").read_text())
        served = served_trigger(f"{url}/v1/models/model:predict", out_dir / "out", model_dir, env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return summarise(report, served, seconds, audit)


def summarise(report: dict[str, Any], served: dict[str, Any], seconds: dict[str, float],
              audit: list[str]) -> dict[str, Any]:
    """The report's own figures beside the served trigger's, and whether each promise holds."""
    utility = report["utility"]
    agreement = report["figures"]["surrogate_agreement"]
    ba_drop = utility["ba_before"] - utility["ba_after"]
    holds = {"agreement_clean": agreement["value"] >= PROMISES["agreement_clean_min"],
             "ba_drop": ba_drop <= PROMISES["ba_drop_max"],
             "asr_after": served["after"]["asr"] <= PROMISES["asr_after_max"]}
    return {
        "command": " ".join(["refine-audit", *audit[1:]]),
        "verdict": report["verdict"]["level"], "headline": report["verdict"].get("headline"),
        "gates_tripped": [g["name"] for g in report.get("gates") or [] if g["tripped"]],
        "fit_to_deploy": (report.get("defended_model") or {}).get("fit_to_deploy"),
        "agreement_clean": agreement, "ba_before": utility["ba_before"], "ba_after": utility["ba_after"],
        "ba_drop": ba_drop, "served_trigger": served, "queries_used": report["queries"]["queries_used"],
        "query_budget": BUDGET, "plan": report["plan"], "stage_seconds": report["timings"]["stages"],
        "wall_seconds": seconds, "controls": [{"attack": c["attack"], "origin": c.get("origin", "trained")}
                                              for c in report.get("positive_controls") or []],
        "promises": PROMISES, "holds": holds, "sound": all(holds.values()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()
    result = run(args)
    where = provenance(torch.device("cpu"), "bench.readme_blackbox")
    write_json(args.out, {**result, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "provenance": where,
                          "git_commit": git_commit()})
    print(json.dumps({k: result[k] for k in ("verdict", "gates_tripped", "ba_drop", "holds", "wall_seconds")},
                     indent=1))


if __name__ == "__main__":
    main()
