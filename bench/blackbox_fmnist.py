"""REFINE through a model API, as a user audits one (Fashion-MNIST, backdoored models behind the reference server).

    python -m bench.blackbox_fmnist                     # BadNets, Blended, WaNet; labels and probabilities
    python -m bench.blackbox_fmnist --attacks badnets --outputs labels --curve ''

For each attack a backdoored small CNN (``bench/audits.py``) is served over KServe v1
on loopback and audited through its URL with spec fields only: ``{"effort": E}`` and
``model.api`` (the output kind; the spec's default budget unless ``--budget``). The
audit's plan splits the budget between distillation, refits, evaluation and probes;
its report gives the surrogate's agreement with the API on clean test images and BA
before and after. The planted trigger's ASR is measured through the API and through
``M ∘ API ∘ T`` built from the audit's artifacts, with a client outside its budget.

``--curve`` adds surrogate agreement against distillation queries on the first attack's
model: audits with one REFINE epoch (no refits) whose budget leaves exactly that many
queries for distillation after evaluation and probes.

    python -m bench.blackbox_fmnist --threads 1 --attacks badnets,blended --curve '' &
    python -m bench.blackbox_fmnist --threads 1 --attacks wanet &
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from auditor.data import take
from auditor.pipeline import FASHION_MNIST, plan_audit
from auditor.runtime import cpu_bf16_pays, resolve_device
from auditor.settings import Settings
from auditor.spec import parse_spec
from bench.audits import api_audit, environment, fashion_mnist, make_subject
from bench.common import RESULTS, ended_otherwise, finished_parts, pct, provenance, write_json

BA_DROP_LIMIT = 0.03  # the bar: defended BA at most 3 points below the undefended API
ASR_LIMIT = 0.05
AGREEMENT_FLOOR = 0.95
TRIGGER_TEST_IMAGES = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnets,blended,wanet")
    p.add_argument("--outputs", default="labels,probabilities")
    p.add_argument("--effort", default="standard")
    p.add_argument("--budget", type=int, default=None, help="model.api.query_budget (default: the spec's)")
    p.add_argument("--curve", default="6000,10000,20000", help="distillation queries of the agreement curve ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/blackbox_fmnist"))
    p.add_argument("--out", type=Path, default=RESULTS / "blackbox_fmnist.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    device = resolve_device(settings.device)
    train, test = fashion_mnist(settings)
    trigger_test = take(test, TRIGGER_TEST_IMAGES, args.seed + 1)
    spec = _spec(args.effort, args.seed, args.budget)
    config = {"spec": spec, "train_epochs": args.train_epochs, "train_size": args.train_size}
    parts = args.out.with_suffix("")
    attacks = args.attacks.split(",")
    for name in attacks:
        subject = make_subject(name, train, test, epochs=args.train_epochs, train_size=args.train_size,
                               seed=args.seed, folder=args.work_dir / "models", device=device,
                               bf16=cpu_bf16_pays(device))
        for output in args.outputs.split(","):
            audit = api_audit(subject, spec, output, args.work_dir / f"{name}-{output}", settings, trigger_test, device)
            entry = _entry(name, output, audit)
            write_json(parts / f"{name}-{output}.json", {"config": config, "entry": entry})
            print(row(entry), flush=True)
        if name == attacks[0] and args.curve:
            write_json(parts / "curve.json", {"config": config, "entry": _curve(subject, args, settings,
                                                                              trigger_test, device)})
    entries = finished_parts(parts, config)
    curve = entries.pop("curve", [])
    runs = sorted(entries.values(), key=lambda e: (attacks.index(e["attack"]) if e["attack"] in attacks else 99,
                                                   e["attack"], e["output"]))
    payload = {
        "benchmark": "blackbox_fmnist", "dataset": "fashion-mnist (60k train / a seeded test subset for the trigger)",
        "config": config, "seed": args.seed, **provenance(device, "bench.blackbox_fmnist"), "runs": runs,
        "budget_curve": curve, "all_meet_bar": bool(runs) and all(all(e["meets_bar"].values()) for e in runs),
        "this_process_wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, payload)
    return payload


def _spec(effort: str, seed: int, budget: int | None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"effort": effort, "seed": seed, "controls": {"attacks": []}, **extra}
    if budget is not None:
        spec["model"] = {"api": {"query_budget": budget}}
    return spec


def _entry(name: str, output: str, audit: dict[str, Any]) -> dict[str, Any]:
    queries = (audit["plan"] or {}).get("queries") or {}
    before, after = audit["before"], audit["after"]
    ok = audit["status"] == "succeeded"
    return {
        "attack": name, "output": output, "query_budget": audit["query_budget"], "queries_used": audit["queries_used"],
        "queries_served": audit.get("queries_served"), "queries_distill": queries.get("distillation"),
        "queries_refit": queries.get("refits"), "queries_evaluation": queries.get("evaluation"),
        "queries_probes": queries.get("probes"), "agreement_clean": audit["agreement_clean"],
        "api": before, "defended": after,
        "meets_bar": {
            "queries": ok and audit["queries_used"] <= audit["query_budget"],
            "agreement": ok and (audit["agreement_clean"] or 0) >= AGREEMENT_FLOOR,
            "asr": ok and after.get("asr") is not None and after["asr"] <= ASR_LIMIT,
            "ba": ok and before["ba"] - after["ba"] <= BA_DROP_LIMIT,
        },
        **{k: audit[k] for k in ("status", "error", "plan", "seconds", "verdict", "gates_tripped", "fit_to_deploy")},
        **environment(),
    }


def _curve(subject: Any, args: argparse.Namespace, settings: Settings, trigger_test: Any,
           device: torch.device) -> list[dict[str, Any]]:
    """Agreement against distillation queries: the budget of each audit leaves exactly D for distillation."""
    points = []
    for output in args.outputs.split(","):
        for distill in (int(d) for d in args.curve.split(",")):
            probe = _spec(args.effort, args.seed, 10**7, refine={"epochs": 1})
            probe["model"]["api"].update(url="http://127.0.0.1:9/v1/models/model:predict", output=output)
            q = plan_audit(parse_spec({**probe, "model": {"source": "api", **probe["model"]}}), FASHION_MNIST).queries
            spec = _spec(args.effort, args.seed, distill + q.evaluation + q.probes, refine={"epochs": 1})
            audit = api_audit(subject, spec, output, args.work_dir / f"curve-{output}-{distill}", settings,
                              trigger_test, device)
            points.append({"attack": subject.name, "output": output, "queries": distill,
                           "planned_distillation": ((audit["plan"] or {}).get("queries") or {}).get("distillation"),
                           "agreement_clean": audit["agreement_clean"], "status": audit["status"]})
            print(f"curve {output} {distill}: {pct(audit['agreement_clean'])}", flush=True)
    return points


def row(entry: dict[str, Any]) -> str:
    a, d = entry["api"], entry["defended"]
    refused = ended_otherwise(entry, entry["attack"], entry["output"])
    if refused:
        return refused
    return (f"| {entry['attack']} | {entry['output']} | {entry['queries_used']} | {pct(entry['agreement_clean'])} | "
            f"{pct(a['ba'])} | {pct(a.get('asr'))} | {pct(d['ba'])} | {pct(d.get('asr'))} | {entry['verdict']} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("| attack | output | queries | agreement (clean test) | API BA | API ASR | defended BA | defended ASR | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    run(args)


if __name__ == "__main__":
    main()
