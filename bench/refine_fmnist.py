"""REFINE on every generated attack, through the audit a user runs (Fashion-MNIST, checkpoints).

    python -m bench.refine_fmnist                        # every attack at standard effort
    python -m bench.refine_fmnist --attacks badnets --effort tiny --train-size 3000 --out /tmp/x.json

For each attack a backdoored small CNN is trained on the 60k training images (the recipe
of ``refine-audit attack``; the label-consistent attack trains 8 epochs, see
``bench/audits.py``) and audited as a checkpoint with ``{"effort": E}`` and no positive
controls (the attack is the subject here). The audit's report gives BA before and after
and the defended model's agreement with the submitted one; the planted trigger's ASR and
RA are measured on the ``defended_model.pt`` the audit ships. Every run records its plan.

On a 2-core machine run one-thread processes on disjoint attacks; each finished attack is
saved beside the output and every process rewrites the combined file:

    python -m bench.refine_fmnist --threads 1 --attacks badnets,blended,wanet,physicalba &
    python -m bench.refine_fmnist --threads 1 --attacks batt,lc,adaptive_patch &
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import attack_names
from auditor.runtime import cpu_bf16_pays, resolve_device
from auditor.settings import Settings
from bench.audits import TRAIN_EPOCHS_BY_ATTACK, checkpoint_audit, environment, fashion_mnist, make_subject
from bench.common import RESULTS, ended_otherwise, finished_parts, pct, provenance, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(attack_names()))
    p.add_argument("--effort", default="standard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=None, help="training images of the backdoored models (all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/refine_fmnist"))
    p.add_argument("--out", type=Path, default=RESULTS / "refine_fmnist.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    device = resolve_device(settings.device)
    train, test = fashion_mnist(settings)
    spec = {"effort": args.effort, "seed": args.seed, "controls": {"attacks": []}}
    config = {"train": {"epochs": args.train_epochs, "size": args.train_size}, "spec": spec}
    parts = args.out.with_suffix("")
    for name in args.attacks.split(","):
        subject = make_subject(name, train, test, epochs=args.train_epochs, train_size=args.train_size,
                               seed=args.seed, folder=args.work_dir / "models", device=device,
                               bf16=cpu_bf16_pays(device))
        audit = checkpoint_audit(subject, spec, args.work_dir / name, settings, test, device)
        entry = {
            "attack": name, "train_epochs": TRAIN_EPOCHS_BY_ATTACK.get(name, args.train_epochs),
            "target": subject.backdoor.attack.target, "poison_rate": subject.backdoor.attack.poison_rate,
            "no_defense": audit["before"], "refine": audit["after"], "agreement_clean": audit["defended_agreement"],
            "attack_train_seconds": subject.train_seconds, "refine_seconds": round(audit["refine_seconds"] or 0, 1),
            **{k: audit[k] for k in ("status", "error", "plan", "seconds", "verdict", "gates_tripped", "fit_to_deploy")},
            **environment(),
        }
        write_json(parts / f"{name}.json", {"config": config, "entry": entry})
        print(row(entry), flush=True)
    entries = finished_parts(parts, config)
    payload = {
        "benchmark": "refine_fmnist", "dataset": "fashion-mnist (60k train / 10k test)", "config": config,
        "seed": args.seed, **provenance(device, "bench.refine_fmnist"),
        "attacks": [entries[n] for n in attack_names() if n in entries],
        "this_process_wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, payload)
    return payload


def row(entry: dict[str, Any]) -> str:
    b, a = entry["no_defense"], entry["refine"]
    refused = ended_otherwise(entry, entry["attack"])
    if refused:
        return refused
    return (f"| {entry['attack']} | {pct(b['ba'])} | {pct(b['asr'])} | {pct(a['ba'])} | {pct(a['asr'])} | "
            f"{pct(a['ra'])} | {pct(entry['agreement_clean'])} | {entry['verdict']} | "
            f"{entry['attack_train_seconds']:.0f} | {entry['refine_seconds']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("| attack | BA no defense | ASR no defense | BA REFINE | ASR REFINE | RA REFINE | agreement | verdict | "
          "attack train s | REFINE s |\n|---|---|---|---|---|---|---|---|---|---|")
    payload = run(args)
    print(f"{len(payload['attacks'])} attacks in {args.out} ({payload['this_process_wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
