"""How much does a label-only API audit's probe score owe to the 100 images it happened to probe? (diagnostic)

    python -m bench.zoo                     # first: build the zoo (bench/zoo.py)
    python -m bench.probe_sampling --samples 20

An API audit probes a seeded sample of 100 test images with the compact battery
(``API_PROBE_BATTERY``, 39 probes): 10 images per class, so one audit's score is one
draw. This diagnostic scores every zoo model with the same battery and seed on
``--samples`` different 100-image samples of the test set (a local model stands in for
the label-only API: the battery reads only labels, so the answers are the ones the API
would give) and reports, per split, the spread of each model's score and of the
held-out ROC-AUC and TPR at 5% FPR across samples.

It is a diagnostic of sampling noise, not a product figure: the product's figures are
bench/detection_fmnist.py's, one audit per model through ``run_audit``.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from auditor.data import ImageSet, load_fashion_mnist, take
from auditor.evaluation import Predictor, model_predictor
from auditor.evaluation.probes import ProbeConfig, suspicion_score
from auditor.models import load_checkpoint
from auditor.pipeline.plan import EFFORTS, probe_config
from auditor.settings import Settings
from bench.common import RESULTS, provenance, write_json
from bench.detection_fmnist import implanted, roc_auc, tpr_at_fpr
from bench.zoo import DEFAULT_OUT, SPLITS, load_manifest

PROBE_IMAGES = EFFORTS["standard"].api_probe_images  # what quick and standard API audits probe (100)


def zoo_predictor(path: Path) -> Predictor:
    """A zoo model answering labels on the CPU, as its label-only API would."""
    return model_predictor(load_checkpoint(path).module.eval(), torch.device("cpu"))


def model_scores(predict: Predictor, samples: list[ImageSet], config: ProbeConfig) -> list[float]:
    """One model's battery score on each image sample."""
    return [round(suspicion_score(predict, sample, config, num_classes=10).score, 4) for sample in samples]


def split_figures(scores: dict[str, list[float]], positive: dict[str, bool], samples: int) -> dict[str, Any]:
    """ROC-AUC and TPR at 5% FPR per sample, summarised."""
    names = sorted(scores)
    aucs = [roc_auc([scores[n][i] for n in names], [positive[n] for n in names]) for i in range(samples)]
    tprs = [tpr_at_fpr([scores[n][i] for n in names], [positive[n] for n in names], 0.05) for i in range(samples)]
    return {"roc_auc": {"mean": round(statistics.mean(aucs), 3), "min": round(min(aucs), 3),
                        "max": round(max(aucs), 3)},
            "tpr_at_5fpr": {"mean": round(statistics.mean(tprs), 3), "min": round(min(tprs), 3),
                            "share_at_least_0.90": round(sum(t >= 0.9 for t in tprs) / samples, 3)}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    settings = Settings.from_env()
    _, test = load_fashion_mnist(settings.fmnist_dir, settings.data_dir)
    config = replace(probe_config(True, PROBE_IMAGES, 0), bootstrap=0)
    samples = [take(test, PROBE_IMAGES, seed=1000 + s) for s in range(args.samples)]
    models = load_manifest(args.zoo)["models"]
    # Poisoned models whose own trigger does not work are neither backdoored nor clean here (as in the fit).
    judged = {n: m for n, m in models.items() if m["spec"]["attack"] is None or implanted(m)}
    rows, by_split = [], {split: {} for split in SPLITS}
    for name, entry in sorted(judged.items()):
        scores = model_scores(zoo_predictor(Path(entry["path"])), samples, config)
        by_split[entry["spec"]["split"]][name] = scores
        rows.append({"name": name, "split": entry["spec"]["split"], "attack": entry["spec"]["attack"],
                     "mean": round(statistics.mean(scores), 3), "sd": round(statistics.pstdev(scores), 3),
                     "min": min(scores), "max": max(scores)})
        print(f"{name}: mean {rows[-1]['mean']} sd {rows[-1]['sd']} [{rows[-1]['min']}, {rows[-1]['max']}]", flush=True)
    positive = {n: m["spec"]["attack"] is not None for n, m in judged.items()}
    payload = {"probe_images": PROBE_IMAGES, "samples": args.samples,
               "splits": {s: split_figures(v, positive, args.samples) for s, v in by_split.items()},
               "models": rows, **provenance(torch.device("cpu"), "bench.probe_sampling")}
    write_json(args.out, payload)
    print(payload["splits"])
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, default=DEFAULT_OUT, help="bench/zoo.py's --out")
    p.add_argument("--samples", type=int, default=20, help="100-image samples per model")
    p.add_argument("--out", type=Path, default=RESULTS / "probe_sampling.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
