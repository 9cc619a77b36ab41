"""White-box REFINE benchmark on Fashion-MNIST: every generated attack, before and after.

    python -m bench.refine_fmnist            # the committed configuration, all attacks
    python -m bench.refine_fmnist --attacks badnets --refine-epochs 2 --out /tmp/x.json

On a 2-core machine two processes with one thread each finish sooner than one
with two threads; every finished attack is saved beside the output, and each
run rewrites the combined file from all attacks finished with the same
configuration:

    python -m bench.refine_fmnist --threads 1 --attacks badnets,blended,wanet,physicalba &
    python -m bench.refine_fmnist --threads 1 --attacks batt,lc,adaptive_patch &

For each attack: train a backdoored small CNN on the 60k training images, score
it (BA on the 10k test images, ASR/RA on their triggered copies), train REFINE
on an unlabeled subset of the training images, score the defended model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from auditor.attacks import AttackConfig, attack_names, train_backdoored_model, train_clean_model
from auditor.data import ImageSet, load_fashion_mnist
from auditor.evaluation import agreement, attack_metrics, model_predictor, predict_labels
from auditor.models import ArchConfig, UNetConfig
from auditor.refine import DefendedModel, RefineConfig, train_refine
from auditor.runtime import cpu_bf16_pays, resolve_device, seed_everything
from auditor.training import TrainConfig
from bench.common import RESULTS, finished_parts, pct, provenance, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(attack_names()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--refine-epochs", type=int, default=RefineConfig.epochs)
    p.add_argument("--pool-size", type=int, default=RefineConfig.pool_size)
    p.add_argument("--unet-width", type=int, default=UNetConfig.width)
    p.add_argument("--unet-depth", type=int, default=UNetConfig.depth)
    p.add_argument("--loss", default=RefineConfig.loss)
    p.add_argument("--lr", type=float, default=RefineConfig.lr)
    p.add_argument("--supcon-weight", type=float, default=RefineConfig.supcon_weight)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: only where the CPU computes it natively)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=RefineConfig.augment)
    p.add_argument("--out", type=Path, default=RESULTS / "refine_fmnist.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.bf16 is None:
        args.bf16 = cpu_bf16_pays(device)
    seed_everything(args.seed)
    train, test = load_fashion_mnist()
    arch = ArchConfig("small_cnn")
    train_config = TrainConfig(epochs=args.train_epochs, bf16=args.bf16)
    refine_config = RefineConfig(
        unet=UNetConfig(in_channels=1, width=args.unet_width, depth=args.unet_depth),
        epochs=args.refine_epochs, pool_size=args.pool_size, loss=args.loss, lr=args.lr,
        supcon_weight=args.supcon_weight, bf16=args.bf16, augment=args.augment,
    )
    payload = {
        "benchmark": "refine_fmnist",
        "dataset": "fashion-mnist (60k train / 10k test)",
        "architecture": arch.to_dict(),
        "config": {"train": train_config.__dict__, "refine": refine_config.to_dict()},
        "seed": args.seed,
        **provenance(device, "bench.refine_fmnist"),
        "attacks": [],
    }
    parts = args.out.with_suffix("")  # one file per finished attack, combined below
    clean_model = None
    for name in args.attacks.split(","):
        clean_seconds = 0.0
        if name == "lc" and clean_model is None:
            clean_started = time.perf_counter()
            clean_model, _ = train_clean_model(arch, train, train_config, device=device, seed=args.seed + 1)
            clean_seconds = time.perf_counter() - clean_started
        attack_train = replace(train_config, epochs=TRAIN_EPOCHS_BY_ATTACK.get(name, train_config.epochs))
        entry = run_attack(name, arch, train, test, attack_train, refine_config, device, args.seed, clean_model)
        entry["clean_model_seconds"] = round(clean_seconds, 1)
        write_json(parts / f"{name}.json", {"config": payload["config"], "entry": entry})
        print(row(entry), flush=True)
    payload["attacks"] = _finished_attacks(parts, payload["config"])
    payload["benchmark_cpu_seconds"] = round(sum(
        e["attack_train_seconds"] + e["refine_seconds"] + e.get("clean_model_seconds", 0) for e in payload["attacks"]
    ), 1)
    payload["this_process_wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, payload)
    return payload


def _finished_attacks(parts: Path, config: dict) -> list[dict]:
    """Entries of every attack finished with this exact configuration, in the catalog's order."""
    entries = finished_parts(parts, config)
    return [entries[name] for name in attack_names() if name in entries]


# The label-consistent attack keeps every label right: the model leans on the patch only once it
# has to fit the PGD-hardened target images, which takes longer than learning a relabelled patch.
# Measured with the catalog's defaults: 85.7% ASR after 4 epochs, 94.0% after 8 (BA 91.4%).
TRAIN_EPOCHS_BY_ATTACK = {"lc": 8}


def run_attack(name, arch, train, test, train_config, refine_config, device, seed, clean_model) -> dict:
    bd = train_backdoored_model(
        arch, train, test, AttackConfig(name, target=0, seed=seed), train_config,
        device=device, seed=seed, clean_model=clean_model,
    )
    before = attack_metrics(model_predictor(bd.model, device), test, bd.poisoned_test, bd.attack.target)
    result = train_refine(bd.model, ImageSet(train.x, None), refine_config, num_classes=10, device=device, seed=seed)
    defended = DefendedModel(result.transform, bd.model, result.mapping)
    after = attack_metrics(model_predictor(defended, device), test, bd.poisoned_test, bd.attack.target)
    fidelity = agreement(
        predict_labels(model_predictor(defended, device), test), predict_labels(model_predictor(bd.model, device), test)
    )
    return {
        "attack": name,
        "train_epochs": train_config.epochs,
        "target": bd.attack.target,
        "poison_rate": bd.attack.poison_rate,
        "poisoned_images": bd.poisoned_count,
        "no_defense": before.to_dict(),
        "refine": after.to_dict(),
        "agreement_clean": fidelity,
        "attack_train_seconds": round(bd.train_seconds, 1),
        "refine_seconds": round(result.seconds, 1),
        "refine_history": result.history,
    }


def row(entry: dict) -> str:
    b, a = entry["no_defense"], entry["refine"]
    return (
        f"| {entry['attack']} | {pct(b['ba'])} | {pct(b['asr'])} | {pct(a['ba'])} | {pct(a['asr'])} | "
        f"{pct(a['ra'])} | {entry['attack_train_seconds']:.0f} | {entry['refine_seconds']:.0f} |"
    )


HEADER = (
    "| attack | BA no defense | ASR no defense | BA REFINE | ASR REFINE | RA REFINE | attack train s | REFINE s |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(HEADER)
    payload = run(args)
    print(f"{len(payload['attacks'])} attacks in {args.out} ({payload['this_process_wall_seconds']:.0f} s in this process)")


if __name__ == "__main__":
    main()
