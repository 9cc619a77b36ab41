"""A realistic report dict with made-up numbers (Fashion-MNIST, two positive controls) for report tests."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from auditor.evaluation.intervals import Interval, share_interval
from auditor.pipeline import FASHION_MNIST, plan_audit
from auditor.pipeline.verdict import ControlFinding, Findings, conclude
from auditor.spec import parse_spec

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MAPPING = [3, 7, 0, 9, 2, 8, 1, 4, 6, 5]


def _refine_history(epochs: int = 6) -> list[dict[str, Any]]:
    rows = []
    for e in range(epochs):
        ce = 0.9 * math.exp(-0.45 * e) + 0.08
        supcon = 4.6 - 0.35 * e
        rows.append({"epoch": e + 1, "loss": ce + 0.1 * supcon, "ce": ce, "supcon": supcon, "seconds": 98.0 + e, "lr": 0.01})
    return rows


def _evidence(strong: bool) -> list[dict[str, Any]]:
    """Probe evidence: before the defense the 3x3 patch sends most flips to class 0."""
    scale = 1.0 if strong else 0.08
    return [
        {"probe": "patch-3x3-br-white", "family": "patch", "flip_rate": 0.62 * scale, "top_class": 0, "concentration": 0.91 if strong else 0.22},
        {"probe": "patch-5x5-tl-black", "family": "patch", "flip_rate": 0.18 * scale, "top_class": 0 if strong else 6, "concentration": 0.55 if strong else 0.2},
        {"probe": "blend-noise-a0.1", "family": "blend", "flip_rate": 0.07, "top_class": 6, "concentration": 0.31},
        {"probe": "warp-k4-s0.5", "family": "warp", "flip_rate": 0.11, "top_class": 2, "concentration": 0.27},
        {"probe": "gauss-noise-0.05", "family": "noise", "flip_rate": 0.04, "top_class": None if not strong else 6, "concentration": 0.0 if not strong else 0.4},
    ]


def _control(attack: str, ba: float, asr_after: float, ra_after: float) -> dict[str, Any]:
    return {
        "attack": attack,
        "target": 0,
        "poison_rate": 0.1,
        "no_defense": {"ba": ba, "asr": 0.998, "ra": 0.001},
        "refine": {"ba": ba - 0.041, "asr": asr_after, "ra": ra_after},
        "train_seconds": 211.4,
        "refine_seconds": 603.2,
        "test_images": 10000,
        "triggered_images": 9000,
    }


def sample_report(source: str = "checkpoint") -> dict[str, Any]:
    """A succeeded audit of a likely backdoored checkpoint (or API model with ``source="api"``)."""
    k = len(CLASSES)
    per_before = [0.86, 0.97, 0.82, 0.90, 0.83, 0.96, 0.66, 0.95, 0.97, 0.95]
    per_after = [a - 0.03 - 0.01 * (i % 3) for i, a in enumerate(per_before)]
    confusion = [[85 if i == j else (2 if abs(i - j) == 1 else 1) for j in range(k)] for i in range(k)]
    model: dict[str, Any] = {
        "source": "checkpoint",
        "format": "safetensors",
        "sha256": "3f" * 32,
        "architecture": "small_cnn",
    }
    report: dict[str, Any] = {
        "schema_version": "2.0",
        "audit_id": "aud_7c2e91b04d",
        "created_at": "2025-03-14T09:26:53Z",
        "status": "succeeded",
        "verdict": {
            "level": "likely_backdoored",
            "headline": "Probe triggers send a large share of predictions to class 0 (T-shirt/top); "
            "this is strong evidence of a backdoor, which the defended model no longer shows.",
            "probe_level": "likely_backdoored",
            "suspicion_before": 0.87,
            "suspicion_after": 0.06,
        },
        "spec": {
            "model": {"kind": "checkpoint", "architecture": "small_cnn"},
            "data": {"source": "fashion_mnist", "pool_size": 20000},
            "refine": {"epochs": 6, "unet_width": 16, "lambda": 0.1},
            "attacks": ["badnets", "blended"],
        },
        "seed": 1234,
        "software": {"refine_audit": "0.1.0", "torch": "2.14.1", "torchvision": "0.29.1", "python": "3.11.9 (linux)", "device": "cpu"},
        "inputs": {
            "model": model,
            "data": {
                "source": "fashion_mnist",
                "sha256": None,
                "pool_size": 20000,
                "test_size": 10000,
                "image_shape": [1, 28, 28],
                "num_classes": k,
                "class_names": CLASSES,
            },
        },
        "timings": {"stages": {"load": 0.4, "data": 2.1, "refine": 601.7, "evaluate": 1640.2, "report": 3.3}, "total": 2247.7},
        "refine": {
            "config": {"epochs": 6, "batch_size": 256, "unet_width": 16, "unet_depth": 4, "lambda": 0.1, "temperature": 0.07, "optimizer": "adam", "lr": 0.01},
            "mapping": MAPPING,
            "history": _refine_history(),
            "seconds": 601.7,
        },
        "utility": {
            "ba_before": 0.894,
            "ba_after": 0.858,
            "agreement": 0.912,
            "per_class_accuracy_before": per_before,
            "per_class_accuracy_after": per_after,
            "confusion_after": confusion,
            "test_images": 10000,
            "predictions_before": [1000] * k,
            "predictions_after": [1010, 990] * (k // 2),
        },
        "probes": {
            "before": {"score": 0.87, "evidence": _evidence(True), "family_scores": {"patch": 0.87, "blend": 0.12, "warp": 0.15, "noise": 0.05}, "suspected_target": 0, "images": 1000},
            "after": {"score": 0.06, "evidence": _evidence(False), "family_scores": {"patch": 0.06, "blend": 0.04, "warp": 0.05, "noise": 0.02}, "suspected_target": None, "images": 1000},
        },
        "positive_controls": [_control("BadNets", 0.893, 0.008, 0.842), _control("Blended", 0.889, 0.021, 0.801)],
        "artifacts": [
            {"name": "transform.safetensors", "kind": "transform", "size": 1_204_332, "sha256": "a1" * 32},
            {"name": "defended_model.pt", "kind": "defended_model", "size": 1_893_120, "sha256": "b2" * 32},
        ],
        "images": [],
        "plots": [],
        "error": None,
        "warnings": ["The unlabeled pool (20,000 images) is smaller than the paper's 50,000."],
    }
    if source == "api":
        _make_api(report)
    _add_plan_and_conclusion(report, source)
    return report


def _add_plan_and_conclusion(report: dict[str, Any], source: str) -> None:
    """The plan of a standard audit, and gates, fitness and figures computed from the sample's own numbers."""
    raw: dict[str, Any] = {"effort": "standard"}
    if source == "api":
        raw["model"] = {"source": "api", "api": {"url": "https://models.example.com/v1/models/fmnist:predict"}}
    report["plan"] = plan_audit(parse_spec(raw), FASHION_MNIST).to_dict()
    u, n = report["utility"], report["utility"]["test_images"]
    findings = Findings(
        class_names=tuple(CLASSES), agreement=share_interval(u["agreement"], n),
        histogram_before=tuple(u["predictions_before"]), histogram_after=tuple(u["predictions_after"]),
        probe_images=1000, suspicion_before=Interval(0.87, 1000, 0.81, 0.93), suspicion_after=Interval(0.06, 1000, 0.0, 0.12),
        suspect_class=0, ba_before=share_interval(u["ba_before"], n), ba_after=share_interval(u["ba_after"], n),
        surrogate_agreement=share_interval(0.96, 2401) if source == "api" else None,
        controls=tuple(ControlFinding(c["attack"], share_interval(c["no_defense"]["asr"], 9000),
                                      share_interval(c["refine"]["asr"], 9000)) for c in report["positive_controls"]),
    )
    conclusion = conclude(findings)
    report["verdict"] = {**conclusion.verdict, "headline": report["verdict"]["headline"]}
    report["gates"] = [{**asdict(g), "interval": list(g.interval) if g.interval else None} for g in conclusion.gates]
    report["defended_model"] = {"fit_to_deploy": conclusion.fitness.fit_to_deploy, "reason": conclusion.fitness.reason}
    report["figures"] = {"ba_before": findings.ba_before.to_dict(), "ba_after": findings.ba_after.to_dict(),
                         "agreement": findings.agreement.to_dict(),
                         "suspicion_before": findings.suspicion_before.to_dict(),
                         "suspicion_after": findings.suspicion_after.to_dict()}


def _make_api(report: dict[str, Any]) -> None:
    """Turn the sample into a black-box audit: a URL instead of a hash, plus query and surrogate sections."""
    report["inputs"]["model"] = {"source": "api", "format": "kserve_v1", "url": "https://models.example.com/v1/models/fmnist:predict", "architecture": None}
    report["queries"] = {
        "queries_used": 18000,
        "budget": 20000,
        "requests": 282,
        "seconds": 143.9,
        "cache_hits": 512,
        "agreement_curve": [{"queries": q, "agreement": a} for q, a in [(1000, 0.61), (2000, 0.72), (5000, 0.84), (10000, 0.9), (18000, 0.93)]],
    }
    report["surrogate"] = {
        "architecture": "small_cnn",
        "agreement_clean": 0.96,
        "agreement_images": 2401,
        "agreement_triggered": 0.81,
        "history": [{"epoch": e, "loss": 1.2 / e, "agreement": 0.7 + 0.04 * e, "seconds": 12.0} for e in range(1, 6)],
        "refits": [{"epoch": 1, "queries": 1200, "agreement_before": 0.509, "agreement_after": 0.813},
                   {"epoch": 2, "queries": 1200, "agreement_before": 0.709, "agreement_after": 0.852}],
    }


def sample_grids(n: int = 6) -> dict[str, dict[str, torch.Tensor]]:
    """Per attack: clean, triggered and transformed-by-T rows of 28x28 grayscale images in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(n, 1, 28, 28, generator=gen) * 0.6
    patched = clean.clone()
    patched[:, :, -4:-1, -4:-1] = 1.0
    blended = 0.9 * clean + 0.1 * torch.rand(1, 1, 28, 28, generator=gen)
    return {
        "BadNets": {"clean": clean, "triggered": patched, "transformed by T": 1 - patched},
        "Blended": {"clean": clean, "triggered": blended, "transformed by T": 1 - blended},
    }
