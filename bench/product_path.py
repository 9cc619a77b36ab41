"""Every effort level, as a user runs it, on every generated attack: checkpoint and model API (Fashion-MNIST).

    python -m bench.product_path                                   # the full grid (hours; a quiet machine)
    python -m bench.product_path --efforts tiny --attacks badnets --train-size 3000 --train-epochs 1 \\
        --out /tmp/product_path.json                               # a smoke run (minutes)

For each attack a backdoored small CNN is trained (the recipe of ``refine-audit
attack``) and audited through ``auditor.pipeline.run_audit`` with spec fields only:
``{"effort": E}`` for a checkpoint, plus ``model.api`` (label-only answers by default,
the spec's default query budget) for the same model served by the reference server
over loopback HTTP. Each run records the audit's plan, its wall time per stage, BA
before and after (the audit's own figures), the planted trigger's ASR before and after
(measured outside the audit, on what it ships), the surrogate's agreement with the API,
the verdict and the gates that tripped, and the machine's load and torch threads.
A plan the spec cannot afford is refused as a user would see it, and recorded so.

Runs are independent: on a 2-core machine start one-thread processes on disjoint
``--attacks``; each finished run is saved beside the output and every process rewrites
the combined file from all runs finished with the same configuration.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import attack_names
from auditor.data import take
from auditor.runtime import cpu_bf16_pays, resolve_device
from auditor.settings import Settings
from bench.audits import api_audit, checkpoint_audit, environment, fashion_mnist, make_subject
from bench.common import RESULTS, ended_otherwise, finished_parts, git_commit, pct, provenance, write_json

EFFORTS = ("quick", "standard", "thorough")
SOURCES = ("checkpoint", "api")
TRIGGER_TEST_IMAGES = 2000  # API runs score the planted trigger on this many test images (2 queries each, twice)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(attack_names()))
    p.add_argument("--efforts", default=",".join(EFFORTS))
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--outputs", default="labels", help="what the served API answers: labels and/or probabilities")
    p.add_argument("--train-epochs", type=int, default=4, help="of the backdoored models (lc trains 8)")
    p.add_argument("--train-size", type=int, default=None, help="training images of the backdoored models (all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/product_path"))
    p.add_argument("--control-cache", type=Path, default=None,
                   help="folder of positive controls shared by the runs, as the CLI's cache is (<work-dir>/control-cache)")
    p.add_argument("--no-control-cache", action="store_true", help="train every control in every run")
    p.add_argument("--out", type=Path, default=RESULTS / "product_path.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    device = resolve_device(settings.device)
    train, test = fashion_mnist(settings)
    config = {"train_epochs": args.train_epochs, "train_size": args.train_size, "seed": args.seed,
              "outputs": args.outputs}
    parts = args.out.with_suffix("")
    commit = git_commit()
    controls = None if args.no_control_cache else args.control_cache or args.work_dir / "control-cache"
    for attack in args.attacks.split(","):
        subject = make_subject(attack, train, test, epochs=args.train_epochs, train_size=args.train_size,
                               seed=args.seed, folder=args.work_dir / "models", device=device,
                               bf16=cpu_bf16_pays(device))
        for effort in args.efforts.split(","):
            for source, output in _sources(args):
                started = time.perf_counter()
                entry = {"effort": effort, "source": source, "output": output, "attack": attack,
                         "git_commit": commit,  # parts of one file may come from runs at different commits
                         **environment(), "subject_train_seconds": subject.train_seconds}
                work = args.work_dir / f"{attack}-{effort}-{source}-{output}"
                spec = {"effort": effort, "seed": args.seed}
                if source == "checkpoint":
                    entry.update(checkpoint_audit(subject, spec, work, settings, test, device, controls))
                else:
                    trigger_test = take(test, TRIGGER_TEST_IMAGES, args.seed + 1)
                    entry.update(api_audit(subject, spec, output, work, settings, trigger_test, device, controls))
                entry["wall_seconds"] = round(time.perf_counter() - started, 1)
                entry["load_average_1m_after"] = environment()["load_average_1m"]
                write_json(parts / f"{attack}-{effort}-{source}-{output or 'file'}.json", {"config": config, "entry": entry})
                print(row(entry), flush=True)
    where = provenance(device, "bench.product_path")
    payload = {"runs": _ordered(finished_parts(parts, config).values()), "command": where["command"],
               "git_commit": commit, "config": config, "provenance": where}
    write_json(args.out, payload)
    return payload


def _sources(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = []
    for source in args.sources.split(","):
        pairs += [("checkpoint", None)] if source == "checkpoint" else [("api", o) for o in args.outputs.split(",")]
    return pairs


def _ordered(runs: Any) -> list[dict[str, Any]]:
    efforts, attacks = {e: i for i, e in enumerate(("tiny", *EFFORTS))}, {a: i for i, a in enumerate(attack_names())}
    return sorted(runs, key=lambda r: (attacks.get(r["attack"], 99), efforts.get(r["effort"], 9), r["source"],
                                       r["output"] or ""))


def row(e: dict[str, Any]) -> str:
    b, a = e["before"], e["after"]
    where = e["source"] if e["output"] is None else f"api ({e['output']})"
    refused = ended_otherwise(e, e["attack"], e["effort"], where)
    if refused:
        return refused
    return (f"| {e['attack']} | {e['effort']} | {where} | {pct(b['ba'])} / {pct(b['asr'])} | {pct(a['ba'])} / "
            f"{pct(a['asr'])} | {pct(e['agreement_clean'])} | {e['verdict']} | {', '.join(e['gates_tripped']) or '-'} | "
            f"{sum(e['seconds'].values()):.0f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("| attack | effort | model | BA / ASR before | BA / ASR after | surrogate agreement | verdict | gates tripped | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    payload = run(args)
    print(f"{len(payload['runs'])} runs in {args.out}")


if __name__ == "__main__":
    main()
