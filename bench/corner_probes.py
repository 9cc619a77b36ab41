"""Does stamping a patch at all four corners at once let the probe battery see four-corner triggers? (diagnostic)

    python -m bench.zoo                     # first: build the zoo (bench/zoo.py)
    python -m bench.corner_probes           # -> bench/results/corner_probes.json

The full battery of checkpoint audits stamped its patches at one corner (or the
centre) at a time until the zoo's second build showed what that cost: a working
label-consistent backdoor (lc-05: four corner patches, true ASR 93%) scored 0.012 at
its checkpoint audit and 0.525 through the API battery, which also stamps all four
corners at once (position ``corners``). This diagnostic scores every zoo model's
battery as a quick checkpoint audit runs it (300 test images, seed 0) with single
corners only and with ``corners`` added (the full battery since), and reports each
split's ROC-AUC and TPR at 5% FPR of the probe score alone, over working backdoors
and clean models. It was the lead for that change; the change itself was refitted on
the calibration split and judged on a build no choice had seen (bench/zoo.py,
``SPLITS``; bench/detection_fmnist.py).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from auditor.data import load_fashion_mnist, take
from auditor.evaluation.probes import POSITIONS
from auditor.pipeline.plan import EFFORTS, probe_config
from auditor.settings import Settings
from bench.common import RESULTS, provenance, write_json
from bench.detection_fmnist import implanted, roc_auc, tpr_at_fpr
from bench.probe_sampling import model_scores, zoo_predictor
from bench.zoo import DEFAULT_OUT, SPLITS, load_manifest

PROBE_IMAGES = EFFORTS["quick"].probe_images  # what the zoo's checkpoint audits probe (300)
BATTERIES = ("single_corners", "with_corners")


def separation(rows: list[dict[str, Any]], battery: str) -> dict[str, Any]:
    """ROC-AUC and TPR at 5% FPR of one battery's probe score over the rows' working backdoors and clean models."""
    scores, positive = [r[battery] for r in rows], [r["backdoored"] for r in rows]
    if all(positive) or not any(positive):
        return {"roc_auc": None, "tpr_at_5fpr": None}
    return {"roc_auc": round(roc_auc(scores, positive), 3), "tpr_at_5fpr": round(tpr_at_fpr(scores, positive, 0.05), 3),
            "clean_max": max(s for s, p in zip(scores, positive) if not p)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    settings = Settings.from_env()
    _, test = load_fashion_mnist(settings.fmnist_dir, settings.data_dir)
    sample = take(test, PROBE_IMAGES, seed=0)
    shipped = replace(probe_config(False, PROBE_IMAGES, 0), bootstrap=0)
    assert "corners" in shipped.patch_positions
    single = tuple(p for p in POSITIONS if p != "corners")
    configs = {"single_corners": replace(shipped, patch_positions=single), "with_corners": shipped}
    models = load_manifest(args.zoo)["models"]
    # Poisoned models whose own trigger does not work are neither backdoored nor clean here (as in the fit).
    judged = {n: m for n, m in models.items() if m["spec"]["attack"] is None or implanted(m)}
    rows = []
    for name, entry in sorted(judged.items()):
        predict = zoo_predictor(Path(entry["path"]))  # loaded once for both batteries
        scores = {b: model_scores(predict, [sample], configs[b])[0] for b in BATTERIES}
        rows.append({"name": name, "split": entry["spec"]["split"], "attack": entry["spec"]["attack"],
                     "backdoored": entry["spec"]["attack"] is not None, **scores})
        print(f"{name}: {scores}", flush=True)
    splits = {s: {b: separation([r for r in rows if r["split"] == s], b) for b in BATTERIES} for s in SPLITS}
    positions = {b: list(configs[b].patch_positions) for b in BATTERIES}
    payload = {"probe_images": PROBE_IMAGES, "patch_positions": positions, "splits": splits, "models": rows,
               **provenance(torch.device("cpu"), "bench.corner_probes")}
    write_json(args.out, payload)
    print(splits)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, default=DEFAULT_OUT, help="bench/zoo.py's --out")
    p.add_argument("--out", type=Path, default=RESULTS / "corner_probes.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
