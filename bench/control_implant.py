"""Positive controls stopped by the implant rule against the whole schedule, and what REFINE removes (Fashion-MNIST).

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.control_implant                   # the implant rule: badnets, blended
    OMP_NUM_THREADS=1 nice -n 10 python -m bench.control_implant --schedule watch  # the fixed schedule
    python -m bench.control_implant --effort tiny --attacks badnets --out /tmp/x.json   # a smoke run

For each attack, a control is trained as an audit at ``--effort`` plans it
(``plan.controls``: training images, held-out split, batch, bf16, the cap) and scored on
the 10,000 test images. ``rule`` trains it as ``auditor/pipeline/controls.py`` does for the
spec's ``controls.stop_rule`` (here ``implanted`` unless ``--stop-rule fixed``: the rule, then the
learning-rate cool-down). ``watch`` trains every epoch of the
cap, the fixed schedule, with the rule watching but not stopping: where it first
holds, the model is scored and the time noted (the steps up to there are those of a
stopped run), and at the cap it is scored again.

What REFINE then removes from each control is measured on the product path, by audits
through ``run_audit`` (``bench.audit_cost``: ``positive_controls[].refine`` in their reports).
``--stop-rule fixed`` trains every step of the cap instead of stopping at the rule (the
audit's default since the runs in ``bench/results/control_removal/``).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import AttackConfig, build_attack, train_backdoored_model
from auditor.attacks.training import ImplantMonitor
from auditor.data import ImageSet, load_fashion_mnist, take
from auditor.evaluation import attack_metrics, model_predictor
from auditor.models import ArchConfig, build_classifier
from auditor.pipeline.controls import control_split, implant_rule
from auditor.pipeline.plan import FASHION_MNIST, plan_audit
from auditor.settings import Settings
from auditor.spec import AuditSpec
from auditor.training import TrainConfig, train_classifier
from bench.common import RESULTS, provenance, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnets,blended")
    p.add_argument("--effort", default="standard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", choices=("rule", "watch"), default="rule",
                   help="rule: train as an audit does (--stop-rule); watch: the fixed schedule, noting where the rule held")
    p.add_argument("--cooldown-share", type=float, default=None,
                   help="try another cool-down than the plan's (rule schedule; a measurement knob, not a spec field)")
    p.add_argument("--stop-rule", choices=("implanted", "fixed"), default="implanted",
                   help="the spec's controls.stop_rule (rule schedule)")
    p.add_argument("--train-epochs", type=int, default=None, help="the spec's controls.train_epochs (the cap)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/control_implant_<schedule>.json")
    return p.parse_args(argv)


def control_run(name: str, plan: Any, pool: ImageSet, test: ImageSet, arch: ArchConfig, seed: int) -> dict[str, Any]:
    """One control to the cap, scored on the test images when the rule first holds and at the cap."""
    c = plan.controls
    device = torch.device("cpu")
    train, holdout = control_split(pool, c, seed + 7)
    attack = build_attack(AttackConfig(name, target=c.target, seed=seed), train.shape)
    poisoned = attack.poison(train, None)
    triggered_test = attack.triggered_test(test)
    torch.manual_seed(seed)
    model = build_classifier(arch)
    monitor = ImplantMonitor(implant_rule(c), model, holdout, attack, device)
    started, at_stop = time.perf_counter(), {}

    def watch(step: int) -> bool:
        if monitor(step) and not at_stop:
            seconds = time.perf_counter() - started
            m = attack_metrics(model_predictor(model, device), test, triggered_test, c.target)
            model.train()
            at_stop.update(steps=step, seconds=seconds, test=m.to_dict(), holdout=monitor.checks[-1])
        return False  # watch only: the run goes on to the cap

    train_classifier(model, poisoned.x, poisoned.y, TrainConfig(epochs=c.epochs, bf16=plan.bf16,
                     batch_size=c.batch_size), device=device, seed=seed, stop=watch, stage="control")
    seconds = time.perf_counter() - started
    m = attack_metrics(model_predictor(model, device), test, triggered_test, c.target)
    checking = len(monitor.checks)
    return {"attack": name, "stopped": at_stop or None,
            "fixed": {"steps": c.max_steps, "seconds": seconds, "test": m.to_dict(),
                      "holdout": monitor.checks[-1] if monitor.checks else None},
            "checks": monitor.checks, "checks_run": checking}


def rule_run(name: str, plan: Any, pool: ImageSet, test: ImageSet, arch: ArchConfig, seed: int) -> dict[str, Any]:
    """One control as an audit trains it now (``train_backdoored_model`` with the plan's rule), scored on the test."""
    c = plan.controls
    train, holdout = control_split(pool, c, seed + 7)
    bd = train_backdoored_model(arch, train, test, AttackConfig(name, target=c.target, seed=seed),
                                TrainConfig(epochs=c.epochs, bf16=plan.bf16, batch_size=c.batch_size),
                                device=torch.device("cpu"), seed=seed, rule=implant_rule(c), holdout=holdout)
    m = attack_metrics(model_predictor(bd.model, torch.device("cpu")), test, bd.poisoned_test, c.target)
    rule = implant_rule(c)
    rule_held = next((ch for i, ch in enumerate(bd.checks)  # where the cool-down began (None: the cap came first)
                      if ch["step"] < bd.train_steps and rule.holds(bd.checks[: i + 1])), None)
    return {"attack": name, "steps": bd.train_steps, "max_steps": bd.max_steps, "seconds": bd.train_seconds,
            "test": m.to_dict(), "holdout_at_end": bd.checks[-1] if bd.checks else None, "rule_held_at": rule_held,
            "checks": bd.checks}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out or RESULTS / f"control_implant_{args.schedule}.json"
    settings = Settings.from_env()
    spec = AuditSpec.model_validate({"effort": args.effort, "seed": args.seed,
                                     "controls": {"attacks": args.attacks.split(","),
                                                  "train_epochs": args.train_epochs, "stop_rule": args.stop_rule}})
    plan = plan_audit(spec, FASHION_MNIST)
    if args.cooldown_share is not None:
        plan = replace(plan, controls=replace(plan.controls, cooldown_share=args.cooldown_share))
    train_all, test_all = load_fashion_mnist(settings.fmnist_dir)
    pool = take(train_all, plan.data.pool_images, spec.seed)
    test = take(test_all, plan.data.test_images, spec.seed + 1)
    x = pool.x[:5000].float() / 255
    arch = ArchConfig("small_cnn", in_channels=1, num_classes=10, image_size=28,
                      mean=tuple(x.mean(dim=(0, 2, 3)).tolist()), std=tuple(x.std(dim=(0, 2, 3)).tolist()))
    where = provenance(torch.device("cpu"), "bench.control_implant")  # the commit the run starts on
    runs = []
    for name in args.attacks.split(","):
        if args.schedule == "rule":
            runs.append(rule_run(name, plan, pool, test, arch, spec.seed))
        else:
            runs.append(control_run(name, plan, pool, test, arch, spec.seed))
        print({k: v for k, v in runs[-1].items() if k != "checks"}, flush=True)
        write_json(args.out, {"plan": plan.controls.__dict__, "bf16": plan.bf16, "runs": runs,
                              "load_average": os.getloadavg(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                              **where})


if __name__ == "__main__":
    main()
