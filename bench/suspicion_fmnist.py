"""Does the audit's suspicion score separate backdoored from clean models? (Fashion-MNIST, the product path)

    python -m bench.suspicion_fmnist                            # checkpoints, the committed configuration
    python -m bench.suspicion_fmnist --sources checkpoint,api   # also through a label-only model API
    python -m bench.suspicion_fmnist --probe-images 50,100,200,500 --models clean-s0-w32,badnets-s10-t0
    python -m bench.suspicion_fmnist --train-only               # only fill the model cache

Trains (or reloads from ``--cache-dir``) several clean small CNNs (different seeds and
widths) and several backdoored ones (different attacks, seeds and target classes) on a
20,000-image training subset, then audits each with ``run_audit`` and spec fields only:
``{"effort": E, "probes": {"images": N}}`` with a one-epoch REFINE on 2,000 images and no
positive controls (the score is computed before the defense; REFINE only has to run).
The score, its 95% interval and the suspected class come from each audit's report. A
model API audit probes with the compact battery of API audits (``API_PROBE_BATTERY``),
so ``--sources api`` measures that battery's separation. Several ``--probe-images`` give
the score against probed images, the measurement behind the probe-evidence gate.
The auditor never sees the attacks' trigger state: probes are drawn from the battery's seed.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import AttackConfig, train_backdoored_model, train_clean_model
from auditor.data import ImageSet, take
from auditor.evaluation import model_predictor, predict_labels
from auditor.models import ArchConfig, Classifier, export_torchscript, load_checkpoint
from auditor.settings import Settings
from auditor.training import TrainConfig
from bench.audits import Subject, api_audit, checkpoint_audit, environment, fashion_mnist
from bench.common import RESULTS, provenance, write_json


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark subject; ``attack`` None means a clean model."""

    name: str
    seed: int
    width: int = 32
    attack: str | None = None
    target: int = 0
    poison_rate: float | None = None  # None = the attack's default

    @property
    def backdoored(self) -> bool:
        return self.attack is not None


#: Targets differ across attacks so the score cannot win by always blaming class 0.
SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("clean-s0-w32", seed=0, width=32),
    ModelSpec("clean-s1-w32", seed=1, width=32),
    ModelSpec("clean-s2-w16", seed=2, width=16),
    ModelSpec("clean-s3-w24", seed=3, width=24),
    ModelSpec("clean-s4-w48", seed=4, width=48),
    ModelSpec("badnets-s10-t0", seed=10, attack="badnets", target=0),
    ModelSpec("blended-s11-t3", seed=11, attack="blended", target=3),
    ModelSpec("wanet-s12-t5", seed=12, attack="wanet", target=5),
    ModelSpec("physicalba-s13-t7", seed=13, attack="physicalba", target=7),
    ModelSpec("batt-s14-t2", seed=14, attack="batt", target=2),
    ModelSpec("adaptive_patch-s15-t9", seed=15, attack="adaptive_patch", target=9),
    # At its default 1% poisoning the adaptive attack does not implant in 3 epochs on 20k images
    # (ASR ~3%); a 3% variant is a working backdoor of the same kind.
    ModelSpec("adaptive_patch-s16-t4-p3", seed=16, attack="adaptive_patch", target=4, poison_rate=0.03),
    ModelSpec("badnets-s17-t8", seed=17, attack="badnets", target=8),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(s.name for s in SPECS), help="comma-separated subset of the specs")
    p.add_argument("--sources", default="checkpoint", help="checkpoint and/or api (label-only, the default budget)")
    p.add_argument("--effort", default="standard")
    p.add_argument("--probe-images", default="500", help="spec probes.images; several (comma-separated) for a curve")
    p.add_argument("--seed", type=int, default=0, help="the audits' seed: draws the probe sample and patterns")
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 leaves a core to other work")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/refine-audit-bench/suspicion_models"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/suspicion_fmnist"))
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "suspicion_fmnist.json")
    return p.parse_args(argv)


def select_specs(names: str) -> list[ModelSpec]:
    """The named specs in the order given (so a partial run trains the interesting ones first)."""
    by_name = {s.name: s for s in SPECS}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {list(by_name)}")
    return [by_name[n] for n in names.split(",")]


def get_model(spec: ModelSpec, train: ImageSet, test: ImageSet, config: TrainConfig,
              cache: Path) -> tuple[Classifier, Path, dict[str, Any]]:
    """The spec's model from the cache, or trained and cached as TorchScript (what a user uploads), with its facts."""
    path = cache / spec.name / "model.pt"
    facts_file = path.parent / "facts.txt"
    if path.exists():
        facts = ast.literal_eval(facts_file.read_text()) if facts_file.exists() else {}
        return load_checkpoint(path).module, path, {**facts, "cached": True}
    device = torch.device("cpu")
    started = time.perf_counter()
    arch = ArchConfig("small_cnn", width=spec.width)
    facts: dict[str, Any] = {"cached": False}
    if spec.attack is None:
        model, _ = train_clean_model(arch, train, config, device=device, seed=spec.seed)
    else:
        attack = AttackConfig(spec.attack, target=spec.target, poison_rate=spec.poison_rate, seed=spec.seed)
        result = train_backdoored_model(arch, train, test, attack, config, device=device, seed=spec.seed)
        model = result.model
        asr_pred = predict_labels(model_predictor(model, device), result.poisoned_test)
        keep = result.poisoned_test.y != spec.target
        facts["asr"] = round((asr_pred[keep] == spec.target).float().mean().item(), 4)
    facts["train_seconds"] = round(time.perf_counter() - started, 1)
    facts["ba"] = round((predict_labels(model_predictor(model, device), test) == test.y).float().mean().item(), 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_torchscript(model, test.x[:2].float() / 255, path)
    facts_file.write_text(repr(facts))
    return model.eval(), path, facts


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """Mann-Whitney U / (n_pos * n_neg): the chance a random positive outscores a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        raise ValueError("ROC-AUC needs at least one positive and one negative")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def audit_spec(args: argparse.Namespace, probe_images: int) -> dict[str, Any]:
    """Spec fields only: the effort, the probed images, a REFINE that only has to run, no positive controls."""
    return {"effort": args.effort, "seed": args.seed, "probes": {"images": probe_images},
            "refine": {"epochs": 1, "pool_size": 2000}, "controls": {"attacks": []}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    full_train, test = fashion_mnist(settings)
    train = take(full_train, args.train_size, seed=0)
    train_config = TrainConfig(epochs=args.train_epochs, bf16=True)
    device = torch.device("cpu")
    payload: dict[str, Any] = {
        "benchmark": "suspicion_fmnist",
        "dataset": f"fashion-mnist ({len(train)}-image training subset for the models; audits on the test split)",
        "config": {"train": train_config.__dict__, "train_size": len(train),
                   "specs": {n: audit_spec(args, int(n)) for n in args.probe_images.split(",")}},
        **provenance(device, "bench.suspicion_fmnist"),
        "models": [],
    }
    for spec in select_specs(args.models):
        model, path, facts = get_model(spec, train, test, train_config, args.cache_dir)
        print(f"{spec.name}: {facts}", flush=True)
        if args.train_only:
            continue
        subject = Subject(spec.name, path, model, None, facts.get("train_seconds", 0.0))
        for source in args.sources.split(","):
            for images in (int(n) for n in args.probe_images.split(",")):
                payload["models"].append(_audit(spec, subject, facts, source, images, args, settings, test, device))
    if not args.train_only and payload["models"]:
        payload["roc_auc"] = _separation(payload["models"])
        payload["seconds"] = round(time.perf_counter() - started, 1)
        payload["notes"] = NOTES
        write_json(args.out, payload)
        print(f"ROC-AUC {payload['roc_auc']}  ({payload['seconds']} s)")
    return payload


def _audit(spec: ModelSpec, subject: Subject, facts: dict[str, Any], source: str, images: int,
           args: argparse.Namespace, settings: Settings, test: ImageSet, device: torch.device) -> dict[str, Any]:
    work = args.work_dir / f"{spec.name}-{source}-{images}"
    fields = audit_spec(args, images)
    if source == "checkpoint":
        audit = checkpoint_audit(subject, fields, work, settings, test, device)
    else:
        audit = api_audit(subject, fields, "labels", work, settings, test, device)
    report = _report(work)
    probes = (report.get("probes") or {}).get("before") or {}
    entry = {
        "name": spec.name, "source": source, "probe_images": images, "backdoored": spec.backdoored,
        "attack": spec.attack, "target": spec.target if spec.backdoored else None,
        "score": probes.get("score"), "interval": (report.get("figures") or {}).get("suspicion_before"),
        "suspected_target": probes.get("suspected_target"),
        "target_named": probes.get("suspected_target") == spec.target if spec.backdoored else None,
        "evidence": probes.get("evidence", [])[:3],
        **{k: v for k, v in facts.items() if k != "cached"},
        **{k: audit[k] for k in ("status", "plan", "seconds", "verdict", "gates_tripped", "queries_used")},
        **environment(),
    }
    print(f"  {source} {images} images: score {entry['score']}  verdict {entry['verdict']}", flush=True)
    return entry


def _report(work: Path) -> dict[str, Any]:
    path = work / "out" / "report.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _separation(rows: list[dict[str, Any]]) -> dict[str, float]:
    """ROC-AUC of the score per source and probed-image count (where both classes of model are present)."""
    out = {}
    for key in sorted({(r["source"], r["probe_images"]) for r in rows}):
        group = [r for r in rows if (r["source"], r["probe_images"]) == key and r["score"] is not None]
        if any(r["backdoored"] for r in group) and not all(r["backdoored"] for r in group):
            out[f"{key[0]}-{key[1]}"] = round(roc_auc([r["score"] for r in group], [r["backdoored"] for r in group]), 3)
    return out


NOTES: list[str] = [
    "Probes never use an attack's own trigger state: patches, blend patterns and warp fields are drawn from the "
    "battery's seed; rotation angles are a fixed generic ladder (+-10/15/20/30 degrees, not BATT's 16).",
    "Score = max over probes of breadth - default pull of the probe's top class, where breadth is the mean share "
    "sent to that class over the least-affected third of the other (clean-predicted) classes. Natural 'default' "
    "classes under heavy blends/noise (Shirt, Pullover on Fashion-MNIST) take look-alike classes but not "
    "trousers/bags/sneakers, so their breadth stays lower than a backdoor's.",
    "Patch backdoors (badnets, physicalba) are caught by corner patches of any fill, not only the attack's pattern: "
    "the learned trigger generalises to any high-contrast patch at its position.",
    "Blended (random-noise pattern, alpha 0.1) is caught because the backdoor generalises to other random-noise "
    "blends and to additive Gaussian noise; a blend trigger made of a natural picture would likely be missed.",
    "WaNet (noise mode) is caught through rotations and other random warps: on 3-epoch models the warp backdoor "
    "generalises to geometric distortion in general. BATT (16-degree rotation) is caught by the 15/20/30-degree probes.",
    "adaptive_patch at its default 1% poisoning does not implant in this budget (ASR ~3%, see 'asr'): it is labelled "
    "backdoored but behaves clean, and its low score is correct behaviour that still counts as a miss in the ROC-AUC. "
    "The 3%-poisoning adaptive_patch variant (ASR ~70%) is MISSED (score ~0.32): its test-time trigger is four "
    "patches stamped in all four corners at once, while the battery stamps one patch at a time, which does not "
    "fire it. A multi-position patch family is the obvious next probe family (not added here to avoid tuning the "
    "battery to the benchmark's triggers).",
    "Known blind spots: triggers that are neither local patches, noise-like blends, warps nor rotations "
    "(input-specific triggers such as IAD, picture blends, colour shifts); a backdoor whose target is also what most "
    "generic disturbances produce is discounted as a default class; small clean margins (clean max ~0.6 vs "
    "threshold 0.75) measured on 5 clean models only.",
]


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
