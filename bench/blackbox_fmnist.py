"""Black-box REFINE benchmark on Fashion-MNIST: backdoored models behind the reference server.

    python -m bench.blackbox_fmnist                     # BadNets, Blended, WaNet; labels and probabilities
    python -m bench.blackbox_fmnist --attacks badnets --outputs labels --budget 5000 --curve 1000,2000

For each attack a backdoored small CNN is served over HTTP (KServe v1, loopback)
and audited only through its API: a surrogate is distilled within the query
budget, REFINE is trained through the surrogate, and the defended pipeline
M o API o T is scored by querying the real API with transformed images. The
white-box REFINE result on the same model is recorded beside it, and the
surrogate's clean agreement is measured for several budgets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from auditor.attacks import AttackConfig, train_backdoored_model
from auditor.blackbox import ApiConfig, DistillConfig, HttpModelAPI, ModelServer, agreement, distill_surrogate
from auditor.blackbox import api_predictor, defended_api_predictor
from auditor.data import ImageSet, load_fashion_mnist, take
from auditor.evaluation import attack_metrics, model_predictor
from auditor.models import ArchConfig
from auditor.refine import DefendedModel, RefineConfig, train_refine
from auditor.runtime import resolve_device, seed_everything
from auditor.training import TrainConfig
from bench.common import RESULTS, pct, provenance, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnets,blended,wanet")
    p.add_argument("--outputs", default="labels,probabilities")
    p.add_argument("--budget", type=int, default=20_000, help="query budget of each audit")
    p.add_argument("--curve", default="1000,2000,5000,10000,20000", help="budgets of the agreement curve ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--distill-epochs", type=int, default=10)
    p.add_argument("--test-size", type=int, default=2000, help="test images scored through the API (each costs 2 queries)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "blackbox_fmnist.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device()
    seed_everything(args.seed)
    train, test_full = load_fashion_mnist()
    test = take(test_full, args.test_size, args.seed)
    arch = ArchConfig("small_cnn")
    refine_config = RefineConfig(bf16=True)
    payload = {
        "benchmark": "blackbox_fmnist",
        "config": {"refine": refine_config.to_dict(), "budget": args.budget, "train_epochs": args.train_epochs,
                   "distill_epochs": args.distill_epochs, "test_size": len(test), "protocol": "v1"},
        "seed": args.seed,
        **provenance(device, "bench.blackbox_fmnist"),
        "runs": [],
        "budget_curve": [],
    }
    for name in args.attacks.split(","):
        bd = train_backdoored_model(arch, train, test, AttackConfig(name, target=0, seed=args.seed),
                                    TrainConfig(epochs=args.train_epochs, bf16=True), device=device, seed=args.seed)
        whitebox = _whitebox(bd, train, test, refine_config, device, args.seed)
        for output in args.outputs.split(","):
            payload["runs"].append(_blackbox_run(bd, train, test, arch, refine_config, output, args, device, whitebox))
            write_json(args.out, payload)
        if name == args.attacks.split(",")[0] and args.curve:
            payload["budget_curve"] = _budget_curve(bd, train, test, arch, args, device)
            write_json(args.out, payload)
    return payload


def _whitebox(bd, train, test, config, device, seed) -> dict:
    result = train_refine(bd.model, ImageSet(train.x, None), config, num_classes=10, device=device, seed=seed)
    defended = DefendedModel(result.transform, bd.model, result.mapping)
    m = attack_metrics(model_predictor(defended, device), test, bd.poisoned_test, bd.attack.target)
    return {"ba": m.ba, "asr": m.asr}


def _client(server: ModelServer, budget: int, output: str) -> HttpModelAPI:
    config = ApiConfig(url=server.url + "/v1/models/model:predict", num_classes=10, protocol="v1",
                       output=output, query_budget=budget, batch_size=256, max_concurrency=2)
    return HttpModelAPI(config, allowed_hosts=("127.0.0.1",))


def _blackbox_run(bd, train, test, arch, refine_config, output, args, device, whitebox) -> dict:
    started = time.perf_counter()
    with ModelServer(bd.model, protocol="v1", labels_only=output == "labels") as server, \
            _client(server, args.budget, output) as api:
        evaluation = 4 * len(test)  # clean and triggered images, before and through T
        distill = DistillConfig(query_budget=args.budget - evaluation - 2 * 1000,
                                train=TrainConfig(epochs=args.distill_epochs, bf16=True))
        surrogate = distill_surrogate(api, ImageSet(train.x, None), arch, distill, device=device, seed=args.seed)
        agreement_clean = surrogate.agreement["holdout"]
        agreement_triggered = agreement(api, surrogate.model, bd.poisoned_test.x[:1000], device=device)
        result = train_refine(surrogate.model, ImageSet(train.x, None), refine_config, num_classes=10, device=device, seed=args.seed)
        before = attack_metrics(api_predictor(api), test, bd.poisoned_test, bd.attack.target)
        after = attack_metrics(defended_api_predictor(api, result.transform, result.mapping, device=device),
                               test, bd.poisoned_test, bd.attack.target)
        used, served = api.queries_used, server.stats()["queries"]
    run = {
        "attack": bd.attack.name, "output": output, "query_budget": args.budget, "queries_used": used,
        "queries_served": served, "agreement_clean": agreement_clean, "agreement_triggered": agreement_triggered,
        "api": {"ba": before.ba, "asr": before.asr}, "defended": {"ba": after.ba, "asr": after.asr},
        "whitebox_refine": whitebox, "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"| {run['attack']} | {output} | {used} | {pct(agreement_clean)} | {pct(before.ba)} | {pct(before.asr)} | "
          f"{pct(after.ba)} | {pct(after.asr)} | {pct(whitebox['ba'])} | {pct(whitebox['asr'])} |", flush=True)
    return run


def _budget_curve(bd, train, test, arch, args, device) -> list[dict]:
    points = []
    for output in args.outputs.split(","):
        for budget in (int(b) for b in args.curve.split(",")):
            with ModelServer(bd.model, protocol="v1", labels_only=output == "labels") as server, \
                    _client(server, budget, output) as api:
                config = DistillConfig(query_budget=budget, train=TrainConfig(epochs=args.distill_epochs, bf16=True))
                result = distill_surrogate(api, ImageSet(train.x, None), arch, config, device=device, seed=args.seed)
                points.append({"output": output, "queries": api.queries_used, "agreement_clean": result.agreement["holdout"]})
    return points


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("| attack | output | queries | agreement | API BA | API ASR | defended BA | defended ASR | white-box BA | white-box ASR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    run(args)


if __name__ == "__main__":
    main()
