"""Black-box REFINE benchmark on Fashion-MNIST: backdoored models behind the reference server.

    python -m bench.blackbox_fmnist                     # BadNets, Blended, WaNet; labels and probabilities
    python -m bench.blackbox_fmnist --attacks badnets --outputs labels --curve ''

For each attack a backdoored small CNN is served over HTTP (KServe v1, loopback)
and audited only through its API, within one query budget that covers everything
the audit sends: a surrogate is distilled from the answers, REFINE is trained
through the surrogate, and the defended pipeline M o API o T is scored by sending
transformed test images to the real API. The backdoored model is the one
``bench.refine_fmnist`` trains with the same seed and schedule, so its white-box
REFINE result is quoted beside the black-box one when that benchmark has run.

On a 2-core machine run one-thread processes side by side; every finished
(attack, output) pair is saved beside the output and each run rewrites the
combined file from all pairs finished with the same configuration:

    python -m bench.blackbox_fmnist --threads 1 --attacks badnets,blended --curve '' &
    python -m bench.blackbox_fmnist --threads 1 --attacks wanet &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import AttackConfig, BackdooredModel, train_backdoored_model
from auditor.blackbox import ApiConfig, DistillConfig, HttpModelAPI, ModelServer, agreement, distill_surrogate
from auditor.blackbox import RefitConfig, SurrogateRefitter, api_predictor
from auditor.blackbox.defended import transform_images
from auditor.data import ImageSet, load_fashion_mnist, take
from auditor.evaluation import attack_metrics
from auditor.models import ArchConfig
from auditor.refine import RefineConfig, RefineResult, train_refine
from auditor.runtime import cpu_bf16_pays, resolve_device, seed_everything
from auditor.training import TrainConfig, predict_logits
from bench.common import RESULTS, finished_parts, pct, provenance, write_json

BA_DROP_LIMIT = 0.03  # the bar: defended BA at most 3 points below the undefended API
ASR_LIMIT = 0.05
AGREEMENT_FLOOR = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnets,blended,wanet")
    p.add_argument("--outputs", default="labels,probabilities")
    p.add_argument("--budget", type=int, default=20_000, help="queries each audit may send, evaluation included")
    p.add_argument("--curve", default="2000,5000,10000,20000",
                   help="distillation budgets of the agreement curve, run on the first attack ('' to skip)")
    p.add_argument("--curve-only", action="store_true", help="only the agreement curve, on the first attack's model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=4, help="backdoored model; 4 matches bench.refine_fmnist")
    p.add_argument("--distill-epochs", type=int, default=10)
    p.add_argument("--refine-epochs", type=int, default=RefineConfig.epochs)
    p.add_argument("--pool-size", type=int, default=RefineConfig.pool_size, help="unlabeled images REFINE trains on")
    p.add_argument("--selection", default=DistillConfig.selection, choices=("random", "balanced", "uncertainty"))
    p.add_argument("--refit-budget", type=int, default=RefitConfig.query_budget,
                   help="queries on transformed images for surrogate refits during REFINE (0: distil once); "
                        "see auditor/blackbox/refit.py")
    p.add_argument("--refit-rounds", type=int, default=RefitConfig.rounds)
    p.add_argument("--test-size", type=int, default=1500,
                   help="clean test images scored through the API; they and their triggered copies cost 2 queries each")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: only where the CPU computes it natively)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "blackbox_fmnist.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device()
    if args.bf16 is None:
        args.bf16 = cpu_bf16_pays(device)
    seed_everything(args.seed)
    train, test_full = load_fashion_mnist()
    test = take(test_full, args.test_size, args.seed)
    config = {
        "refine": _refine_config(args).to_dict(), "budget": args.budget, "train_epochs": args.train_epochs,
        "distill_epochs": args.distill_epochs, "selection": args.selection, "test_size": len(test),
        "protocol": "v1", "surrogate_arch": "small_cnn",
    }
    if args.refit_budget:
        config["refit"] = _refit_config(args).__dict__
    payload: dict[str, Any] = {
        "benchmark": "blackbox_fmnist",
        "dataset": "fashion-mnist (60k train as the unlabeled pool / a seeded test subset)",
        "config": config,
        "seed": args.seed,
        **provenance(device, "bench.blackbox_fmnist"),
    }
    parts = args.out.with_suffix("")
    attacks = args.attacks.split(",")
    for name in attacks:
        bd = train_backdoored_model(ArchConfig("small_cnn"), train, test_full, AttackConfig(name, target=0, seed=args.seed),
                                    TrainConfig(epochs=args.train_epochs, bf16=args.bf16), device=device, seed=args.seed)
        for output in [] if args.curve_only else args.outputs.split(","):
            entry = blackbox_audit(bd, train, test, output, args, device)
            entry.update(_whitebox_reference(name, args))
            write_json(parts / f"{name}-{output}.json", {"config": config, "entry": entry})
            print(row(entry), flush=True)
        if name == attacks[0] and args.curve:
            curve = budget_curve(bd, train, test, args, device)
            write_json(parts / "curve.json", {"config": config, "entry": curve})
    payload.update(_combined(parts, config))
    payload["this_process_wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, payload)
    return payload


def blackbox_audit(bd: BackdooredModel, train: ImageSet, test: ImageSet, output: str, args: argparse.Namespace,
                   device: torch.device) -> dict[str, Any]:
    """One audit through the API: distil, REFINE through the surrogate, score M o API o T on the real API."""
    started = time.perf_counter()
    triggered = _triggered_non_target(bd, test)
    evaluation_queries = 2 * (len(test) + len(triggered))  # each image raw and through T
    pool = ImageSet(train.x, None)
    refit = _refit_config(args)
    with ModelServer(bd.model, protocol="v1", labels_only=output == "labels") as server, \
            _client(server, args.budget, output) as api:
        distill = DistillConfig(query_budget=args.budget - evaluation_queries - refit.query_budget,
                                selection=args.selection, train=TrainConfig(epochs=args.distill_epochs, bf16=args.bf16))
        surrogate = distill_surrogate(api, pool, ArchConfig("small_cnn"), distill, device=device, seed=args.seed)
        distill_queries = api.queries_used
        # Scored on the distilled surrogate (the number); these images are paid for by the evaluation.
        agreement_test = agreement(api, surrogate.model, test.x, device=device)
        agreement_triggered = agreement(api, surrogate.model, triggered.x, device=device)
        refine_started = time.perf_counter()
        refitter = SurrogateRefitter(api, surrogate, pool, args.refine_epochs, refit, device=device, seed=args.seed)
        result = train_refine(surrogate.model, pool, _refine_config(args), num_classes=10, device=device,
                              seed=args.seed, adapt_model=refitter if refit.query_budget else None)
        refine_seconds = time.perf_counter() - refine_started
        before = attack_metrics(api_predictor(api), test, triggered, bd.attack.target)
        transfer: list[torch.Tensor] = []
        after = attack_metrics(_recording_defended_predictor(api, surrogate.model, result, transfer, device),
                               test, triggered, bd.attack.target)
        used, served = api.queries_used, server.stats()["queries"]
    return {
        "attack": bd.attack.name, "output": output, "query_budget": args.budget, "queries_used": used,
        "queries_served": served, "queries_distill": distill_queries, "queries_refit": refitter.queries_used,
        "queries_evaluation": used - distill_queries - refitter.queries_used,
        "agreement_clean": agreement_test, "agreement_holdout": surrogate.agreement["holdout"],
        "agreement_triggered": agreement_triggered,
        # The surrogate REFINE ended with against the API, on the transformed images the evaluation sent.
        "agreement_transformed": float(torch.cat(transfer).float().mean()),
        "refits": refitter.rounds,
        "api": before.to_dict(), "defended": after.to_dict(),
        "meets_bar": {
            "queries": used <= args.budget,
            "agreement": agreement_test >= AGREEMENT_FLOOR,
            "asr": after.asr <= ASR_LIMIT,
            "ba": before.ba - after.ba <= BA_DROP_LIMIT,
        },
        "surrogate_seconds": round(refine_started - started, 1), "refine_seconds": round(refine_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def budget_curve(bd: BackdooredModel, train: ImageSet, test: ImageSet, args: argparse.Namespace,
                 device: torch.device) -> list[dict[str, Any]]:
    """Surrogate agreement on clean test images against the number of distillation queries."""
    points = []
    for output in args.outputs.split(","):
        for budget in (int(b) for b in args.curve.split(",")):
            with ModelServer(bd.model, protocol="v1", labels_only=output == "labels") as server, \
                    _client(server, budget + len(test), output) as api:
                config = DistillConfig(query_budget=budget, selection=args.selection,
                                       train=TrainConfig(epochs=args.distill_epochs, bf16=args.bf16))
                result = distill_surrogate(api, ImageSet(train.x, None), ArchConfig("small_cnn"), config,
                                           device=device, seed=args.seed)
                distilled = api.queries_used
                points.append({"attack": bd.attack.name, "output": output, "queries": distilled,
                               "agreement_clean": agreement(api, result.model, test.x, device=device),
                               "agreement_holdout": result.agreement["holdout"]})
            print(f"curve {output} {distilled}: {pct(points[-1]['agreement_clean'])}", flush=True)
    return points


def _recording_defended_predictor(api: HttpModelAPI, surrogate: torch.nn.Module, result: RefineResult,
                                  agree: list[torch.Tensor], device: torch.device):
    """M o API o T, also recording whether the surrogate agrees with the API on each transformed image."""
    def predict(xb: torch.Tensor) -> torch.Tensor:
        transformed = transform_images(result.transform, xb, device)
        answers = api.predict(transformed).argmax(1)
        agree.append(predict_logits(surrogate, transformed, device=device).argmax(1) == answers)
        return result.mapping[answers]
    return predict


def _refit_config(args: argparse.Namespace) -> RefitConfig:
    return RefitConfig(query_budget=args.refit_budget, rounds=args.refit_rounds, bf16=args.bf16)


def _refine_config(args: argparse.Namespace) -> RefineConfig:
    return RefineConfig(epochs=args.refine_epochs, pool_size=args.pool_size, bf16=args.bf16)


def _client(server: ModelServer, budget: int, output: str) -> HttpModelAPI:
    config = ApiConfig(url=server.url + "/v1/models/model:predict", num_classes=10, protocol="v1",
                       output=output, query_budget=budget, batch_size=256, max_concurrency=2)
    return HttpModelAPI(config, allowed_hosts=("127.0.0.1",))


def _triggered_non_target(bd: BackdooredModel, test: ImageSet) -> ImageSet:
    """Triggered copies of the scored test images whose true class is not the target (ASR ignores the rest)."""
    triggered = bd.attack.triggered_test(test)
    assert triggered.y is not None
    keep = triggered.y != bd.attack.target
    return ImageSet(triggered.x[keep], triggered.y[keep])


def _whitebox_reference(attack: str, args: argparse.Namespace) -> dict[str, dict[str, float] | None]:
    """The white-box result on the same backdoored model, from bench.refine_fmnist's saved part (None if absent)."""
    part = RESULTS / "refine_fmnist" / f"{attack}.json"
    saved = json.loads(part.read_text()) if part.exists() else None
    same_model = saved is not None and saved["config"]["train"]["epochs"] == args.train_epochs and args.seed == 0
    if not same_model or saved["config"]["refine"] != _refine_config(args).to_dict():
        return {"whitebox_refine": None, "whitebox_no_defense": None}
    return {"whitebox_refine": saved["entry"]["refine"], "whitebox_no_defense": saved["entry"]["no_defense"]}


def _combined(parts: Path, config: dict) -> dict[str, Any]:
    """Every (attack, output) pair and the curve finished with this exact configuration."""
    entries = finished_parts(parts, config)
    curve = entries.pop("curve", [])
    runs = list(entries.values())
    order = {"badnets": 0, "blended": 1, "wanet": 2}
    runs.sort(key=lambda e: (order.get(e["attack"], 9), e["attack"], e["output"]))
    return {"runs": runs, "budget_curve": curve,
            "all_meet_bar": bool(runs) and all(all(e["meets_bar"].values()) for e in runs)}


def row(entry: dict[str, Any]) -> str:
    a, d = entry["api"], entry["defended"]
    return (f"| {entry['attack']} | {entry['output']} | {entry['queries_used']} | {pct(entry['agreement_clean'])} | "
            f"{pct(a['ba'])} | {pct(a['asr'])} | {pct(d['ba'])} | {pct(d['asr'])} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("| attack | output | queries | agreement (clean test) | API BA | API ASR | defended BA | defended ASR |")
    print("|---|---|---|---|---|---|---|---|")
    run(args)


if __name__ == "__main__":
    main()
