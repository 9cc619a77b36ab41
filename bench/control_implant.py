"""Positive controls trained until the backdoor implants, against the old fixed schedule (Fashion-MNIST).

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.control_implant                  # badnets, blended at standard
    python -m bench.control_implant --effort tiny --attacks badnets --out /tmp/x.json   # a smoke run

For each attack, a control is trained exactly as an audit at ``--effort`` plans it
(``plan.controls``: training images, held-out split, batch, bf16, the cap), with the
stopping rule watching but not stopping: the run goes on to the cap. The learning-rate
schedule spans the cap either way, so the steps up to the rule's stop are the steps a
stopped control takes; at that point the model is scored on the 10,000 test images and
the wall time noted, and at the cap it is scored again. So one run gives both: the
control an audit now trains, and the one the fixed schedule (every epoch of the cap)
trained, on the same images.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import AttackConfig, build_attack
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
    p.add_argument("--out", type=Path, default=RESULTS / "control_implant.json")
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings.from_env()
    spec = AuditSpec.model_validate({"effort": args.effort, "seed": args.seed,
                                     "controls": {"attacks": args.attacks.split(",")}})
    plan = plan_audit(spec, FASHION_MNIST)
    train_all, test_all = load_fashion_mnist(settings.fmnist_dir)
    pool = take(train_all, plan.data.pool_images, spec.seed)
    test = take(test_all, plan.data.test_images, spec.seed + 1)
    x = pool.x[:5000].float() / 255
    arch = ArchConfig("small_cnn", in_channels=1, num_classes=10, image_size=28,
                      mean=tuple(x.mean(dim=(0, 2, 3)).tolist()), std=tuple(x.std(dim=(0, 2, 3)).tolist()))
    runs = []
    for name in args.attacks.split(","):
        runs.append(control_run(name, plan, pool, test, arch, spec.seed))
        print(runs[-1]["attack"], runs[-1]["stopped"], runs[-1]["fixed"], flush=True)
        write_json(args.out, {"plan": plan.controls.__dict__, "bf16": plan.bf16, "runs": runs,
                              "load_average": os.getloadavg(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                              **provenance(torch.device("cpu"), "bench.control_implant")})


if __name__ == "__main__":
    main()
