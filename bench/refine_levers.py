"""Which REFINE settings remove a trigger the default leaves: spec variants audited as a user would run them.

    OMP_NUM_THREADS=2 python -m bench.refine_levers --attack blended --threads 2 \\
        --variants '[{}, {"refine": {"epochs": 12}}, {"refine": {"pool_size": 40000}}]'

One backdoored small CNN (the recipe of ``refine-audit attack``, as in ``bench.product_path``)
is audited through ``run_audit`` as a checkpoint at one effort, once per variant: each
variant is a set of spec fields merged over ``{"effort": E, "controls": {"attacks": []}}``.
Positive controls are off, because the question is what REFINE does to *this* model's
trigger, and a control's REFINE would be retrained for every variant; the verdicts are
therefore not the point (they lack controls). Each run records the plan, the seconds per
stage, BA before and after (the audit's) and the planted trigger's ASR before and after
(measured on the defended model the audit wrote). A lever found here becomes a default
only after the seven-attack product-path run holds with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from auditor.runtime import cpu_bf16_pays, resolve_device
from auditor.settings import Settings
from bench.audits import checkpoint_audit, environment, fashion_mnist, make_subject
from bench.common import RESULTS, pct, provenance, write_json


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section (one level deep, as the spec's sections are)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", default="blended")
    p.add_argument("--effort", default="standard")
    p.add_argument("--variants", default='[{}, {"refine": {"epochs": 12}}]', help="JSON list of spec fields")
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/refine_levers"))
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/refine_levers_<attack>.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    device = resolve_device(settings.device)
    train, test = fashion_mnist(settings)
    subject = make_subject(args.attack, train, test, epochs=args.train_epochs, train_size=None, seed=args.seed,
                           folder=args.work_dir / "models", device=device, bf16=cpu_bf16_pays(device))
    base = {"effort": args.effort, "seed": args.seed, "controls": {"attacks": []}}
    out = args.out or RESULTS / f"refine_levers_{args.attack}.json"
    runs = []
    for i, variant in enumerate(json.loads(args.variants)):
        spec = merged(base, variant)
        work = args.work_dir / f"{args.attack}-{i}"
        shutil.rmtree(work, ignore_errors=True)  # a REFINE checkpoint of the same configuration would be resumed
        run = checkpoint_audit(subject, spec, work, settings, test, device)
        runs.append({"variant": variant, "spec": spec, "attack": args.attack, **environment(), **run})
        b, a = run["before"], run["after"]
        print(f"| {json.dumps(variant)} | {pct(b['ba'])} / {pct(b['asr'])} | {pct(a['ba'])} / {pct(a['asr'])} | "
              f"{run['refine_seconds'] or 0:.0f} s REFINE |", flush=True)
        # Written after every variant: a run of several REFINEs stopped part-way keeps what it measured.
        write_json(out, {"runs": runs, "subject_train_seconds": subject.train_seconds,
                         **provenance(device, "bench.refine_levers")})
    print(f"{len(runs)} runs in {out}")


if __name__ == "__main__":
    main()
