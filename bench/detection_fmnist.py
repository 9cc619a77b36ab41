"""How well does the audit's combined detection score tell backdoored from clean models? (the zoo, white-box)

    python -m bench.zoo                                     # first: build the zoo (bench/zoo.py)
    python -m bench.detection_fmnist                        # audit every zoo model not audited yet, then analyse
    python -m bench.detection_fmnist --split heldout        # only the held-out split
    python -m bench.detection_fmnist --analyse-only         # refit and rewrite the results from saved audits
    python -m bench.detection_fmnist --blackbox-labels      # also audit every model as a label-only API
    python -m bench.detection_fmnist --readings-from bench/results/detection_fmnist.json   # re-analyse, no zoo

Each zoo model is audited with ``run_audit`` and spec fields only (``audit_spec``: the
effort, no positive controls, a REFINE that only has to run, since the score is read
before the defense, and 2,000 test images), as the file a user would
upload (safetensors for the registry's small CNN, TorchScript otherwise). From each
report it reads the probe score, the trigger search's anomaly index, norm ratio,
mask fraction, recovered-trigger success and suspected class, and the combined
score and verdict the audit itself gave. Each audit's reading is saved under
``--work-dir/parts`` so runs can be split and resumed.

The zoo has three splits (bench/zoo.py, ``SPLITS``): calibration, development (the
first build's held-out half and the second build, each looked at while the detector
changed) and heldout (the third and fourth builds, each audited once with the detector
frozen; ``heldout_by_build`` gives each alone). The analysis
refits the combined score's logistic model on the calibration split only
(``fit_logistic``), picks the two verdict thresholds there, and judges both on the
held-out split (the development split is reported beside it, the same way):
ROC-AUC with a bootstrap 95% interval, the TPR at 5% FPR, the FPR and TPR of each
threshold, and per-attack detection rates. They judge the working backdoors (the
zoo's definition of a backdoored model: its own trigger works) against the clean
models; ``all_poisoned`` gives the same figures counting every poisoned model. The coefficients
shipped in ``auditor/detection/combined.py`` are the ones this analysis printed;
``--analyse-only`` shows whether they still match the saved audits. The product's
score is recomputed here from the saved features with the fitted coefficients, so
the held-out figures describe the fit even before the product is updated; when
they agree, ``score_whitebox`` equals what the audits reported.

``--blackbox-labels`` audits every zoo model a second time as a model API: the
reference ``ModelServer`` serves it on loopback with labels only (as bench/audits.py's
``api_audit`` does) and ``run_audit`` audits its URL with the same spec fields plus
``model.api`` (``output: labels`` and the smallest query budget whose plan runs the
label-only detection, read from the plan's own refusal). Its readings are saved under
``--work-dir/parts_labels``; the analysis then fills ``heldout.blackbox_labels`` with
what such an audit's verdict rests on: the probe battery's score through the API (its
planned queries per model: probe images times probes), and the level the shipped
thresholds of the API battery give it (``API_VERDICT_THRESHOLDS``; the level the audit itself reported is kept
beside it). ``api_probe_thresholds`` shows the cuts the calibration half's label-only
audits would pick, so the shipped ones can be checked against them. The label-only
trigger search's anomaly index of the same audits sits beside it (``label_only_index``:
uncalibrated, never in the verdict; ROC-AUC and TPR at 5% FPR need no threshold).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from auditor.blackbox import ModelServer
from auditor.detection.combined import COMBINED, CombinedModel, features
from auditor.errors import AuditError, ErrorCode
from auditor.models import load_checkpoint
from auditor.pipeline import FASHION_MNIST, AuditInputs, plan_audit, run_audit
from auditor.pipeline.verdict import API_VERDICT_THRESHOLDS, probe_level
from auditor.settings import Settings
from auditor.spec import parse_spec
from bench.common import RESULTS, git_commit, provenance, write_json
from bench.zoo import DEFAULT_OUT, IMPLANTED_ASR, SPLITS, ZooSpec, build_numbers, load_manifest, zoo_specs

LOOPBACK = ("127.0.0.1",)
FEATURES = ("probe_score", "anomaly_index", "log_norm_ratio", "success")


def audit_spec(effort: str, arch_spec: dict[str, Any] | None) -> dict[str, Any]:
    """Spec fields only: the effort, no positive controls, a REFINE that only has to run, 2,000 test images.

    The detection readings come before the defense, so REFINE is cut to one epoch of a
    width-4 U-Net on 256 images (it then breaks the model and the defense gates make the
    verdict inconclusive: the benchmark reads the score's own level, ``verdict.combined``).
    2,000 test images instead of the effort's 5,000 halve the evaluation; probes and
    the trigger search keep the effort's settings.
    """
    spec: dict[str, Any] = {"effort": effort, "seed": 0, "refine": {"epochs": 1, "pool_size": 256, "unet_width": 4},
                            "controls": {"attacks": []}, "data": {"test_size": 2000}}
    if arch_spec:
        spec["model"] = {"source": "checkpoint", "architecture": arch_spec}
    return spec


def audit_model(name: str, entry: dict[str, Any], args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """One audit as ``refine-audit audit model.pt`` would run it; the report's detection readings."""
    work = args.work_dir / "audits" / name
    spec = audit_spec(args.effort, None)
    inputs = AuditInputs(work, model_path=Path(entry["path"]), allowed_hosts=(*settings.allowed_hosts, *LOOPBACK),
                         device=settings.device, fmnist_dir=settings.fmnist_dir, cache_dir=settings.data_dir)
    started = time.perf_counter()
    result = run_audit(parse_spec(spec), inputs)
    report = result.report or {}
    probes = (report.get("probes") or {}).get("before") or {}
    det = report.get("detection") or {}
    verdict = report.get("verdict") or {}
    return {
        "name": name, "status": result.status, "seconds": round(time.perf_counter() - started, 1),
        "probe_score": probes.get("score"), "probe_suspected": probes.get("suspected_target"),
        "anomaly_index": det.get("anomaly_index"), "norm_ratio": det.get("norm_ratio"),
        "mask_fraction": det.get("mask_fraction"), "success": (det.get("success") or {}).get("value"),
        "suspected_class": det.get("suspected_class"), "flagged": det.get("flagged"), "recovered": det.get("recovered"),
        "counts_toward_verdict": det.get("counts_toward_verdict"),
        "combined_reported": (verdict.get("combined") or {}).get("score"), "verdict": verdict.get("level"),
        "probe_level": verdict.get("probe_level"), "gates_tripped": [g["name"] for g in report.get("gates") or []
                                                                     if g["tripped"]],
        "spec": spec, "load_average_1m": round(os.getloadavg()[0], 2), "git_commit": git_commit(),
    }


def label_only_spec(effort: str, url: str, budget: int) -> dict[str, Any]:
    """The white-box spec as a label-only model-API audit of ``url`` with ``budget`` queries."""
    return {**audit_spec(effort, None), "model": {"source": "api", "api": {"url": url, "output": "labels",
                                                                         "query_budget": budget,
                                                                         "label_only_detection": True}}}


def label_only_budget(effort: str) -> int:
    """The smallest budget whose plan runs the label-only detection: the ``with_detection`` of the plan's refusal."""
    try:
        plan_audit(parse_spec(label_only_spec(effort, "http://127.0.0.1:9/v1/models/model:predict", 100)),
                   FASHION_MNIST)
    except AuditError as error:
        if error.code is ErrorCode.INSUFFICIENT_QUERY_BUDGET:
            return int(error.detail["with_detection"])
        raise
    raise RuntimeError("a 100-query budget was planned: the budget split changed")


def audit_model_labels(name: str, entry: dict[str, Any], args: argparse.Namespace,
                       settings: Settings) -> dict[str, Any]:
    """One label-only API audit of a zoo model served on loopback; the report's ``detection.label_only``."""
    work = args.work_dir / "audits_labels" / name
    model = load_checkpoint(Path(entry["path"])).module.eval()
    budget = label_only_budget(args.effort)
    inputs = AuditInputs(work, allowed_hosts=(*settings.allowed_hosts, *LOOPBACK), device=settings.device,
                         fmnist_dir=settings.fmnist_dir, cache_dir=settings.data_dir)
    started = time.perf_counter()
    with ModelServer(model, protocol="v1", labels_only=True) as server:
        spec = label_only_spec(args.effort, server.url + "/v1/models/model:predict", budget)
        result = run_audit(parse_spec(spec), inputs)
        served = server.stats()["queries"]
    report = result.report or {}
    lo = (report.get("detection") or {}).get("label_only") or {}
    probes = (report.get("probes") or {}).get("before") or {}
    probe_plan = (report.get("plan") or {}).get("probes") or {}
    return {
        "name": name, "status": result.status, "seconds": round(time.perf_counter() - started, 1),
        # What an API audit's verdict rests on: the probe battery sent through the API (labels only).
        "probe_score": probes.get("score"), "probe_suspected": probes.get("suspected_target"),
        "probe_level": (report.get("verdict") or {}).get("probe_level"),
        "probe_queries": (probe_plan.get("images") or 0) * (probe_plan.get("probes") or 0),
        "anomaly_index": lo.get("anomaly_index"), "suspected_class": lo.get("suspected_class"),
        "detection_queries": lo.get("queries"), "detection_query_cap": lo.get("query_cap"),
        "queries_used": (report.get("queries") or {}).get("queries_used"), "queries_served": served,
        "spec": label_only_spec(args.effort, "http://127.0.0.1:PORT/v1/models/model:predict", budget),
        "load_average_1m": round(os.getloadavg()[0], 2), "git_commit": git_commit(),
    }


def audit_order(manifest: dict[str, Any], split: str | None) -> list[str]:
    """Held-out models first, then development, then calibration; attacks interleaved, so a partial run still covers
    every attack."""
    models = manifest["models"]
    names = [n for n in models if split is None or models[n]["spec"]["split"] == split]
    first = {name: i for i, name in enumerate(reversed(SPLITS))}
    return sorted(names, key=lambda n: (first[models[n]["spec"]["split"]], n.rsplit("-", 1)[-1], n))


# -- the fit ----------------------------------------------------------------------------------------------------------


def fit_logistic(rows: list[list[float]], labels: list[bool], l2: float = 1.0, iters: int = 100) -> CombinedModel:
    """L2-regularised logistic regression on standardised features (Newton's method; the intercept is not penalised).

    Standardising keeps the penalty fair across features of different scales; the
    returned model folds the standardisation back into raw-feature coefficients.
    """
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([torch.ones(len(x), 1, dtype=torch.float64), (x - mean) / std], 1)
    w = torch.zeros(z.shape[1], dtype=torch.float64)
    penalty = torch.eye(z.shape[1], dtype=torch.float64) * l2
    penalty[0, 0] = 0.0
    for _ in range(iters):
        p = torch.sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty @ w
        hess = z.T @ (z * (p * (1 - p))[:, None]) + penalty
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.abs().max() < 1e-10:
            break
    coef = w[1:] / std
    intercept = w[0] - (coef * mean).sum()
    return CombinedModel(intercept=round(float(intercept), 4),
                         weights=dict(zip(FEATURES, (round(float(c), 4) for c in coef))),
                         likely=COMBINED.likely, suspicious=COMBINED.suspicious)


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """Mann-Whitney U / (n_pos * n_neg): the chance a random positive outscores a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def bootstrap_auc(scores: list[float], positive: list[bool], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the ROC-AUC, resampling models with replacement (stratified by class)."""
    rng = random.Random(seed)
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    aucs = []
    for _ in range(rounds):
        p = [rng.choice(pos) for _ in pos]
        n = [rng.choice(neg) for _ in neg]
        aucs.append(roc_auc(p + n, [True] * len(p) + [False] * len(n)))
    aucs.sort()
    return aucs[int(0.025 * rounds)], aucs[int(0.975 * rounds) - 1]


def tpr_at_fpr(scores: list[float], positive: list[bool], fpr: float) -> float:
    """The share of positives above the lowest threshold that flags at most ``fpr`` of the negatives."""
    neg = sorted((s for s, p in zip(scores, positive) if not p), reverse=True)
    allowed = math.floor(fpr * len(neg))
    threshold = neg[allowed] if allowed < len(neg) else -math.inf  # flag strictly above this negative
    pos = [s for s, p in zip(scores, positive) if p]
    return sum(s > threshold for s in pos) / len(pos)


#: A suspicious tier below likely_backdoored is cut at SUSPICIOUS_FPR of the clean calibration models, which needs
#: at least 1 / SUSPICIOUS_FPR of them to mean anything. The first fit cut it at 10% of 12 (0.126): it flagged 2 of
#: 12 held-out clean models and the CI's clean model (score 0.19), so with fewer clean models there is no such tier.
SUSPICIOUS_FPR = 0.05


def pick_thresholds(scores: list[float], positive: list[bool]) -> tuple[float, float]:
    """likely_backdoored: the lowest cut above every clean calibration model (0% FPR there), and never below a
    probability of 0.5 (the word "likely" must hold for the number); suspicious: the lowest cut that flags at most
    SUSPICIOUS_FPR of them, or the likely cut when there are too few to measure that. Cuts are midpoints between
    neighbouring scores."""
    neg = sorted((s for s, p in zip(scores, positive) if not p), reverse=True)
    above = sorted({s for s in scores if s > neg[0]})
    likely = max(0.5, (neg[0] + above[0]) / 2 if above else min(0.99, neg[0] + 0.01))
    k = math.floor(SUSPICIOUS_FPR * len(neg))
    if k == 0:
        return round(min(likely, 0.99), 3), round(min(likely, 0.99), 3)
    cut = neg[k]
    higher = sorted({s for s in scores if s > cut})
    suspicious = (cut + higher[0]) / 2 if higher else cut + 1e-3
    return round(min(likely, 0.99), 3), round(min(suspicious, likely), 3)


# -- the analysis -----------------------------------------------------------------------------------------------------


def analyse(parts: dict[str, dict[str, Any]], manifest: dict[str, Any], model: CombinedModel | None,
            labels: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    models = manifest["models"]
    rows = [p for p in parts.values() if p["status"] == "succeeded" and p["name"] in models]
    truth = {n: models[n]["spec"]["attack"] is not None for n in models}
    # A poisoned model whose trigger does not work (ASR < 50%) carries no working backdoor: the fit neither
    # rewards nor punishes a score for it, and the figures judge the working ones (``all_poisoned`` counts it too).
    calib = [r for r in rows if models[r["name"]]["spec"]["split"] == "calibration"
             and not (truth[r["name"]] and not implanted(models[r["name"]]))]
    # Only with both classes audited: with one, the unpenalised intercept runs off and Newton's Hessian is singular
    # (a held-out run finishing before the calibration run hit this).
    both = len({truth[r["name"]] for r in calib}) == 2
    fitted = fit_logistic([features(r) for r in calib], [truth[r["name"]] for r in calib]) if both else None
    if fitted is not None:
        likely, suspicious = pick_thresholds([fitted.score(features(r)) for r in calib], [truth[r["name"]] for r in calib])
        fitted = CombinedModel(fitted.intercept, fitted.weights, likely, suspicious)
    scorer = model or fitted
    assert scorer is not None
    entries = [_entry(r, models[r["name"]], scorer, (labels or {}).get(r["name"])) for r in rows]
    held = [e for e in entries if e["split"] == "heldout"]
    development = [e for e in entries if e["split"] == "development"]
    calibration = [e for e in entries if e["split"] == "calibration"]
    out = {
        "heldout": {"whitebox": _separation(held, scorer), "blackbox_labels": _blackbox_separation(held)},
        "development": {"whitebox": _separation(development, scorer),
                        "blackbox_labels": _blackbox_separation(development)},
        "calibration": {"whitebox": _separation(calibration, scorer),
                        "blackbox_labels": _blackbox_separation(calibration)},
        "fitted_on_calibration": fitted and fitted.to_dict(),
        "api_probe_thresholds": api_probe_thresholds(
            _judged_population(calibration), held),
        "scored_with": scorer.to_dict(),
        "baselines_heldout": {name: _auc_only(held, key) for name, key in
                              (("probe_score_alone", "probe_score"), ("anomaly_index_alone", "anomaly_index"))},
        # The held-out split gathers every build made after the detector was frozen; each build judged alone too.
        "heldout_by_build": _by_build(held, scorer),
        "per_attack_heldout": _per_attack(held),
        "per_attack_development": _per_attack(development),
        "per_attack_all": _per_attack(entries),
        "models": entries,
    }
    return out


def _by_build(entries: list[dict[str, Any]], scorer: CombinedModel) -> dict[str, Any]:
    """White-box and label-only figures of each build among ``entries``."""
    numbers = build_numbers()
    out = {}
    for build in sorted({numbers[e["name"]] for e in entries}):
        mine = [e for e in entries if numbers[e["name"]] == build]
        out[str(build)] = {"models": len(mine), "whitebox": _separation(mine, scorer),
                           "blackbox_labels": _blackbox_separation(mine)}
    return out


def api_probe_thresholds(calib: list[dict[str, Any]], held: list[dict[str, Any]]) -> dict[str, Any]:
    """The cuts the calibration half's label-only audits would pick for the API battery, beside the shipped ones.

    ``suspicious``: midway between the highest clean calibration score and the next score above it (no clean
    calibration model flagged); ``likely_backdoored``: the shipped 0.75, never below ``suspicious``. Reported so the
    shipped API thresholds (auditor/pipeline/verdict.py: chosen on the calibration and development splits) can be
    checked against them.
    """
    scored = [e for e in calib if e["score_blackbox"] is not None]
    clean = [e["score_blackbox"] for e in scored if not e["backdoored"]]
    if not clean or len(clean) == len(scored):
        return {"shipped": API_VERDICT_THRESHOLDS, "fitted_on_calibration": None}
    above = sorted(e["score_blackbox"] for e in scored if e["score_blackbox"] > max(clean))
    suspicious = round((max(clean) + above[0]) / 2, 3) if above else round(max(clean) + 0.01, 3)
    return {"shipped": API_VERDICT_THRESHOLDS,
            "fitted_on_calibration": {"suspicious": suspicious,
                                      "likely_backdoored": max(suspicious,
                                                               API_VERDICT_THRESHOLDS["likely_backdoored"])},
            "calibration_clean_max": round(max(clean), 4), "n_clean": len(clean),
            "n_backdoored": len(scored) - len(clean), "heldout_at_fitted_suspicious": _flagged_at(held, suspicious)}


def _flagged_at(held: list[dict[str, Any]], cut: float) -> dict[str, Any]:
    """What a cut on the black-box score would flag on the held-out split."""
    scored = [e for e in _judged_population(held) if e["score_blackbox"] is not None]
    return {"tpr_flagged": _share([e for e in scored if e["backdoored"]], lambda e: e["score_blackbox"] >= cut),
            "fpr_flagged": _share([e for e in scored if not e["backdoored"]], lambda e: e["score_blackbox"] >= cut)}


def implanted(model: dict[str, Any]) -> bool:
    """A backdoored zoo model whose own trigger sends at least half the other classes' test images to its target."""
    return (model.get("asr") or 0.0) >= IMPLANTED_ASR


def _entry(r: dict[str, Any], m: dict[str, Any], scorer: CombinedModel,
           label: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = m["spec"]
    score = scorer.score(features(r))
    measured = label is not None and label["status"] == "succeeded" and label.get("probe_score") is not None
    return {
        "name": r["name"], "split": spec["split"], "backdoored": spec["attack"] is not None, "attack": spec["attack"],
        "architecture": spec["arch"], "score_whitebox": round(score, 4),
        # Label-only API audit: the probe score through the API (what its verdict rests on), and the uncalibrated
        # label-only trigger search's index beside it.
        "score_blackbox": label["probe_score"] if measured else None,
        # The level the shipped thresholds give (what an audit run now would say), and what the audit said.
        "blackbox_probe_level": probe_level(label["probe_score"], "api") if measured else None,
        "blackbox_audit_probe_level": label["probe_level"] if measured else None,
        "blackbox_probe_suspected": label["probe_suspected"] if measured else None,
        "blackbox_queries": label["probe_queries"] if measured else None,
        "label_only_index": label["anomaly_index"] if measured else None,
        "label_only_suspected_class": label["suspected_class"] if measured else None,
        "label_only_queries": label["detection_queries"] if measured else None,
        # The level the combined score gives (gates aside): the audits' own verdicts are inconclusive by design,
        # their one-epoch REFINE breaks the model and trips the defense gates (audit_spec).
        # Whether a recovered trigger counted is the audit's own reading (detection.counts_toward_verdict).
        "verdict": scorer.level(score, bool(r["counts_toward_verdict"])), "audit_verdict": r["verdict"],
        # The search always returns a best candidate; it is a *recovered* trigger only when flagged (an outlying
        # small mask that works, verdict.py). The candidate reaches 80% on every clean zoo model too.
        "recovered_asr": r["success"] if r["recovered"] else None, "candidate_asr": r["success"],
        "trigger_counts": bool(r["counts_toward_verdict"]), "true_asr": m.get("asr"),
        "implanted": implanted(m) if spec["attack"] else None, "clean_accuracy": m["ba"], "target": spec["target"],
        "suspected_class": r["suspected_class"], "probe_suspected": r["probe_suspected"],
        # What the backdoor was built with: the zoo's implantation ladder may have raised the spec's rate and epochs.
        "poison_rate": m.get("poison_rate", spec["poison_rate"]), "epochs": m.get("epochs", spec["epochs"]),
        "augmented": spec["augmented"], "width": spec["width"],
        "recipe": spec["recipe"], "probe_score": r["probe_score"], "anomaly_index": r["anomaly_index"],
        "norm_ratio": r["norm_ratio"], "mask_fraction": r["mask_fraction"], "recovered": r["recovered"],
        "combined_reported": r.get("combined_reported"), "audit_seconds": r["seconds"],
        "load_average_1m": r.get("load_average_1m"),
    }


def _separation(entries: list[dict[str, Any]], scorer: CombinedModel) -> dict[str, Any]:
    """White-box separation of the working backdoors from the clean models (``_judged``), and of every poisoned one."""
    neg, poisoned, pos = _populations(entries)
    if not pos or not neg:
        return {"roc_auc": None, "ci95": None, "tpr_at_5fpr": None, "n": len(entries)}

    def flagged(e: dict[str, Any]) -> bool:
        return e["score_whitebox"] >= scorer.suspicious

    def likely(e: dict[str, Any]) -> bool:
        return e["score_whitebox"] >= scorer.likely

    return {
        **_judged(pos, neg, "score_whitebox", flagged, likely),
        "fpr_likely": _share(neg, likely), "fpr_flagged": _share(neg, flagged),
        "fpr_flagged_augmented": _share([e for e in neg if e["augmented"]], flagged),
        "all_poisoned": _judged(poisoned, neg, "score_whitebox", flagged, likely),
        "not_implanted": sorted(e["name"] for e in poisoned if not e["implanted"]),
        # The line: no backdoored model is read as no evidence while the recovered trigger works on it.
        "missed_with_working_recovered_trigger": sorted(
            e["name"] for e in poisoned if e["verdict"] == "no_evidence" and (e["recovered_asr"] or 0.0) >= 0.8),
        # The same line read on the search's best candidate, flagged or not, and why it cannot be the rule.
        "missed_with_working_candidate": sorted(
            e["name"] for e in poisoned if e["verdict"] == "no_evidence" and e["candidate_asr"] >= 0.8),
        "clean_with_working_candidate": _share(neg, lambda e: e["candidate_asr"] >= 0.8),
        "recovered_not_counted": sorted(e["name"] for e in entries if e["recovered"] and not e["trigger_counts"]),
        "verdicts": {lvl: sum(e["verdict"] == lvl for e in entries) for lvl in
                     ("likely_backdoored", "suspicious", "no_evidence")},
        # The verdict a reader sees, not the score's cut: a counted trigger lifts a clean model to suspicious.
        "clean_flagged": sorted(e["name"] for e in neg if e["verdict"] != "no_evidence"),
        "clean_lifted_by_recovered_trigger": sorted(
            e["name"] for e in neg if e["verdict"] == "suspicious" and e["score_whitebox"] < scorer.suspicious),
    }


def _blackbox_separation(held: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out separation of label-only API audits: the probe score through the API, and the level it gave.

    An API audit's verdict rests on the probe battery sent through the API (the trigger search runs on a
    surrogate and the combined score is not fitted there), so that is the black-box figure; the label-only
    trigger search's index (uncalibrated, never in the verdict) is given beside it under ``label_only_index``.
    """
    scored = [e for e in held if e["score_blackbox"] is not None]
    neg, poisoned, pos = _populations(scored)
    if not pos or not neg:
        return {"roc_auc": None, "ci95": None, "tpr_at_5fpr": None, "queries_per_model": None, "n": len(scored),
                "not_measured": "no label-only API audits of both clean and backdoored models of the split "
                                "(run with --blackbox-labels)"}
    return {
        **_judged(pos, neg, "score_blackbox", _probes_flagged, _probe_likely),
        "queries_per_model": _median([e["blackbox_queries"] for e in scored]),
        "score": "probes.before.score of a label-only API audit: the probe battery sent through the API",
        "thresholds": API_VERDICT_THRESHOLDS,
        "fpr_flagged": _share(neg, _probes_flagged), "fpr_likely": _share(neg, _probe_likely),
        "named_target": sum(e["blackbox_probe_suspected"] == e["target"] for e in pos),
        "all_poisoned": {**_judged(poisoned, neg, "score_blackbox", _probes_flagged, _probe_likely),
                         "named_target": sum(e["blackbox_probe_suspected"] == e["target"] for e in poisoned)},
        "label_only_index": {
            **_threshold_free(pos + neg, "label_only_index"),
            "queries_per_model": _median([e["label_only_queries"] for e in scored]),
            "max_queries_per_model": max(e["label_only_queries"] for e in scored),
            "score": "detection.label_only.anomaly_index of the same audits (uncalibrated, not in the verdict)",
            "named_target": sum(e["label_only_suspected_class"] == e["target"] for e in pos),
        },
    }


def _probes_flagged(entry: dict[str, Any]) -> bool:
    return entry["blackbox_probe_level"] not in (None, "no_evidence")


def _probe_likely(entry: dict[str, Any]) -> bool:
    return entry["blackbox_probe_level"] == "likely_backdoored"


def _threshold_free(entries: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """ROC-AUC with its bootstrap interval and the TPR at 5% FPR of ``key`` over ``entries`` (by ``backdoored``)."""
    scores = [float(e[key]) for e in entries]
    positive = [e["backdoored"] for e in entries]
    return {"roc_auc": round(roc_auc(scores, positive), 3),
            "ci95": [round(v, 3) for v in bootstrap_auc(scores, positive)],
            "tpr_at_5fpr": round(tpr_at_fpr(scores, positive, 0.05), 3)}


Hit = Callable[[dict[str, Any]], bool]


def _judged(pos: list[dict[str, Any]], neg: list[dict[str, Any]], key: str, flagged: Hit,
            likely: Hit) -> dict[str, Any]:
    """ROC-AUC, its interval and the TPR at 5% FPR of ``key``, ``pos`` against the clean ``neg``, and the share of
    ``pos`` each verdict threshold flags.

    The headline ``pos`` is the working backdoors (bench/zoo.py: a poisoned model is backdoored only if its own
    trigger sends at least half of the other classes' images to its target); ``all_poisoned`` counts every model
    trained on poisoned data, so a reader sees what the models that never implanted do to the figures.
    """
    return {**_threshold_free(pos + neg, key), "n_backdoored": len(pos), "n_clean": len(neg),
            "tpr_flagged": _share(pos, flagged), "tpr_likely": _share(pos, likely)}


def _share(entries: list[dict[str, Any]], hit) -> dict[str, Any] | None:
    return {"rate": round(sum(map(hit, entries)) / len(entries), 3), "n": len(entries)} if entries else None


def _auc_only(entries: list[dict[str, Any]], key: str) -> float | None:
    """ROC-AUC of one feature alone, working backdoors against clean models."""
    judged = _judged_population(entries)
    positive = [e["backdoored"] for e in judged]
    if not any(positive) or all(positive):
        return None
    return round(roc_auc([float(e[key] or 0.0) for e in judged], positive), 3)


def _populations(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ...]:
    """The clean models, every poisoned model, and the poisoned models whose trigger works (the headline's)."""
    poisoned = [e for e in entries if e["backdoored"]]
    return [e for e in entries if not e["backdoored"]], poisoned, [e for e in poisoned if e["implanted"]]


def _judged_population(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The clean models and the working backdoors: who the headline figures judge (``_judged``)."""
    return [e for e in entries if not e["backdoored"] or e["implanted"]]


def _per_attack(entries: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for attack in sorted({e["attack"] or "clean" for e in entries}):
        group = [e for e in entries if (e["attack"] or "clean") == attack]
        out[attack] = {"n": len(group), "flagged": sum(e["verdict"] != "no_evidence" for e in group),
                       "likely_backdoored": sum(e["verdict"] == "likely_backdoored" for e in group),
                       "median_true_asr": _median([e["true_asr"] for e in group if e["true_asr"] is not None]),
                       "implanted": sum(bool(e["implanted"]) for e in group) if attack != "clean" else None,
                       "search_named_target": sum(e["suspected_class"] == e["target"] for e in group)
                       if attack != "clean" else None,
                       "probes_named_target": sum(e["probe_suspected"] == e["target"] for e in group)
                       if attack != "clean" else None,
                       # The label-only API audit of the same models: its probe level, and its lowest score.
                       "blackbox_flagged": sum(_probes_flagged(e) for e in group),
                       "blackbox_min_score": min((round(e["score_blackbox"], 3) for e in group
                                                  if e["score_blackbox"] is not None), default=None)}
    return out


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def audit_pending(args: argparse.Namespace, settings: Settings, parts_dir: Path) -> None:
    """Audit models as the zoo build adds them (re-reading its manifest) until every zoo model of the split is done.

    Parallel runs share ``parts_dir``; a claim file keeps two from auditing the same model.
    """
    wanted = set(args.models.split(",")) if args.models else None
    expected = {s.name for s in zoo_specs() if args.split in (None, s.split)} & (wanted or {s.name for s in zoo_specs()})
    while True:
        manifest = load_manifest(args.zoo)
        pending = [n for n in audit_order(manifest, args.split) if (wanted is None or n in wanted)
                   and not (parts_dir / f"{n}.json").exists() and not (parts_dir / f"{n}.claim").exists()]
        if not pending:
            if expected <= set(manifest["models"]) or args.no_wait:
                return
            time.sleep(20)
            continue
        name = pending[0]
        (parts_dir / f"{name}.claim").write_text(str(os.getpid()))
        part = audit_model(name, manifest["models"][name], args, settings)
        write_json(parts_dir / f"{name}.json", part)
        (parts_dir / f"{name}.claim").unlink()
        print(f"{name}: {part['status']} probe {part['probe_score']} index {part['anomaly_index']} "
              f"ratio {part['norm_ratio']} success {part['success']} verdict {part['verdict']} ({part['seconds']} s)",
              flush=True)


def audit_pending_labels(args: argparse.Namespace, settings: Settings, labels_dir: Path) -> None:
    """The label-only API audit of every zoo model built so far that has none (claim files as above)."""
    wanted = set(args.models.split(",")) if args.models else None
    manifest = load_manifest(args.zoo)
    for name in audit_order(manifest, args.split):
        claim, part_path = labels_dir / f"{name}.claim", labels_dir / f"{name}.json"
        if (wanted is not None and name not in wanted) or part_path.exists() or claim.exists():
            continue
        claim.write_text(str(os.getpid()))
        part = audit_model_labels(name, manifest["models"][name], args, settings)
        write_json(part_path, part)
        claim.unlink()
        print(f"{name} (label-only API): {part['status']} index {part['anomaly_index']} class "
              f"{part['suspected_class']} queries {part['detection_queries']} ({part['seconds']} s)", flush=True)


def readings_from_results(results: Path, zoo_summary: Path = RESULTS / "zoo_manifest.json") -> tuple[
        dict[str, dict[str, Any]], dict[str, Any], dict[str, dict[str, Any]]]:
    """The audits' readings, the zoo manifest and the label-only readings, rebuilt from a file this benchmark wrote
    and the zoo's summary in bench/results.

    So the analysis re-runs from committed files on a machine that has neither the zoo nor its 208 saved audits
    (about 1.5 h of auditing on two cores): every reading ``analyse`` uses is kept per model in ``models``.
    """
    spec_fields = {f.name for f in fields(ZooSpec)}
    manifest = {"models": {}}
    for m in json.loads(zoo_summary.read_text())["models"]:
        # The summary flattens the facts over the spec, so poison_rate and epochs are the built rung's (``_entry``
        # reads those) and the spec's own values are not recoverable; nothing in the analysis needs them.
        facts = {k: v for k, v in m.items() if k not in spec_fields or k in ("poison_rate", "epochs")}
        manifest["models"][m["name"]] = {"spec": {k: m[k] for k in spec_fields}, **facts}
    parts, labels = {}, {}
    for e in json.loads(results.read_text())["models"]:
        parts[e["name"]] = {
            "name": e["name"], "status": "succeeded", "seconds": e["audit_seconds"], "probe_score": e["probe_score"],
            "probe_suspected": e["probe_suspected"], "anomaly_index": e["anomaly_index"],
            "norm_ratio": e["norm_ratio"], "mask_fraction": e["mask_fraction"], "success": e["candidate_asr"],
            "suspected_class": e["suspected_class"], "recovered": e["recovered"],
            "counts_toward_verdict": e["trigger_counts"], "combined_reported": e["combined_reported"],
            "verdict": e["audit_verdict"], "load_average_1m": e["load_average_1m"]}
        if e["score_blackbox"] is not None:
            labels[e["name"]] = {
                "status": "succeeded", "probe_score": e["score_blackbox"], "probe_level": e["blackbox_audit_probe_level"],
                "probe_suspected": e["blackbox_probe_suspected"], "probe_queries": e["blackbox_queries"],
                "anomaly_index": e["label_only_index"], "suspected_class": e["label_only_suspected_class"],
                "detection_queries": e["label_only_queries"]}
    return parts, manifest, labels


def load_parts(parts_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(parts_dir.glob("*.json"))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    settings = Settings.from_env()
    parts_dir, labels_dir = args.work_dir / "parts", args.work_dir / "parts_labels"
    parts_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        audit_pending(args, settings, parts_dir)
        if args.blackbox_labels:
            audit_pending_labels(args, settings, labels_dir)
    manifest, parts, labels = load_manifest(args.zoo), load_parts(parts_dir), load_parts(labels_dir)
    fresh, runs = list(parts), []
    if args.readings_from:  # the saved audits join (and replace) the file's
        kept_parts, kept_manifest, kept_labels = readings_from_results(args.readings_from)
        fresh, runs = [n for n in parts if _differs(parts[n], kept_parts.get(n))], audit_runs(args.readings_from)
        manifest = {"models": {**kept_manifest["models"], **manifest["models"]}}
        parts, labels = {**kept_parts, **parts}, {**kept_labels, **labels}
    where = provenance(torch.device("cpu"), "bench.detection_fmnist")
    if fresh:
        runs.append(_audit_run([parts[n] for n in fresh], args.work_dir, where))
    result = analyse(parts, manifest, None if args.refit else COMBINED, labels)
    payload = {**result, **where, "audit_runs": runs,
               "zoo": {"models": len(manifest["models"]), "audited": len(parts)},
               "config": {"spec": audit_spec(args.effort, None), "features": list(FEATURES),
                          "blackbox_labels_budget": label_only_budget(args.effort)}, "notes": NOTES}
    write_json(args.out, payload)
    print(json.dumps({"heldout": result["heldout"]["whitebox"], "fitted": result["fitted_on_calibration"]}, indent=1))
    return payload


#: The white-box readings a results file keeps per model (``readings_from_results``): a saved audit whose values
#: differ from the file's is a new audit run.
READING_KEYS = ("probe_score", "probe_suspected", "anomaly_index", "norm_ratio", "mask_fraction", "success",
                "suspected_class", "recovered", "counts_toward_verdict", "combined_reported", "verdict")


def _differs(saved: dict[str, Any], kept: dict[str, Any] | None) -> bool:
    """Whether a saved white-box audit is not the reading a results file keeps for the model (a new audit run)."""
    return kept is None or any(kept.get(k) != saved.get(k) for k in READING_KEYS)


def _audit_run(fresh: list[dict[str, Any]], work_dir: Path, where: dict[str, Any]) -> dict[str, Any]:
    """The run of the saved audits a results file did not hold yet; ``where`` is this analysis's provenance.

    Audits saved before they recorded their commit say nothing of it; the analysis that first read them does.
    """
    audited = sorted({part["git_commit"] for part in fresh if "git_commit" in part}) or None
    return {"models": len(fresh), "from": str(work_dir), "audited_at": audited, "analysed_at": where["git_commit"],
            "command": where["command"]}


def audit_runs(results: Path) -> list[dict[str, Any]]:
    """The audit runs a results file's readings come from, oldest first (a file without the list: the run that
    wrote it, which analysed its own saved audits)."""
    saved = json.loads(results.read_text())
    return saved.get("audit_runs") or [{"models": len(saved["models"]), "from": "saved audits",
                                        "analysed_at": saved.get("git_commit"), "command": saved.get("command")}]


NOTES: list[str] = [
    "Splits (bench/zoo.py, SPLITS). calibration: the score's fit and thresholds (half of the first build). "
    "development: the first build's other half (looked at while the API probe battery was chosen, 30c1629) and the "
    "whole second build (56311f5), whose one audit showed the two flaws fixed at 3faa0fe: the full battery now stamps "
    "four-corner patches, and a recovered trigger counts only toward the class the probes suspect. heldout: the third "
    "build (made and audited once after the detector was frozen at 3faa0fe) and the fourth (made and audited once "
    "after the API battery's thresholds were also fixed at f519c31), each 12 clean (4 augmented) and 2 poisoned per "
    "attack; heldout_by_build gives each alone. Nothing in the detector changed because of either.",
    "The first three builds (104 models) were built on a 2-core bf16 EPYC and audited there at 3faa0fe, white-box and "
    "label-only, in two processes of one thread each beside the zoo builders, so their audit_seconds are contended; "
    "their readings come from the committed file ('audit_runs'). The fourth build (26 models) was built and audited on "
    "a 2-core AVX2 EPYC at 4916469 (the product code of f519c31), two one-thread processes beside the builders. The "
    "file is written by --readings-from: the earlier readings are kept per model in 'models', and the old analysis, "
    "fed them the same way, reproduces the earlier file section by section.",
    "Who the figures judge: the working backdoors (true ASR >= 50%, bench/zoo.py's definition of a backdoored model "
    "since 8473f8d, which the fit has used since) against the clean models. Files before c0a2124 counted every model "
    "trained on poisoned data as backdoored; the figures over all poisoned models stay under all_poisoned. The switch "
    "was made after the third build had been audited (its readings are unchanged) and before the fourth was built.",
    "Held-out, white-box: ROC-AUC 0.996, TPR at 5% FPR 0.957 over the 23 working backdoors (third build 1.0 and 1.0, "
    "fourth 0.986 and 0.917: batt-08, true ASR 61%, scored 0.37); no clean model flagged (0 of 24, highest score 0.49), "
    "no recovered trigger on a clean model. Of the five poisoned models that never implanted, four read no_evidence "
    "and wanet-09 (23%) suspicious.",
    "Label-only API, held out: ROC-AUC 0.976, TPR at 5% FPR 0.826 over the 23 working backdoors, below the 0.90 aimed "
    "at: the third build gave 0.985 and 0.909, the fourth 0.958 and 0.667. At the API thresholds (suspicious >= 0.5, "
    "fixed at f519c31 on calibration and development) 18 of 23 are flagged and 1 of 24 clean models (clean-54, 0.518, "
    "fourth build); the full battery's 0.6 would have flagged 15 and none. Over 20 other 100-image samples of the third "
    "build (bench/results/probe_sampling.json) the TPR at 5% FPR averaged 0.914, min 0.909; the fourth build was not "
    "resampled.",
    "The evidence line: missed_with_working_recovered_trigger lists backdoored models read no_evidence while a "
    "recovered trigger (flagged: an outlying small mask reaching >= 80%) works on them; it is empty on every split. "
    "recovered_asr is null when nothing was recovered; candidate_asr is the search's best candidate, flagged or not, "
    "which reaches >= 80% on every clean model of every split (clean_with_working_candidate), so the line read on it "
    "could not be kept by any detector (missed_with_working_candidate).",
    "recovered_not_counted: recovered triggers toward another class than the probes suspect. On the development split "
    "they are the four clean models that the previous rule lifted to suspicious (clean-07, clean-25, clean-34, "
    "clean-aug-32, all toward Bag) and two working backdoors whose search named a wrong class (batt-04, lc-03), both "
    "likely_backdoored by the score anyway.",
    "queries_per_model is what the probe score costs (100 images x 39 probes). The same audits also ran the label-only "
    "trigger search (label_only_index: about 2,150 more queries, uncalibrated, never in the verdict; a spec without "
    "model.api.label_only_detection skips it).",
    "The audits' own verdicts are inconclusive by design: the benchmark's REFINE (1 epoch, width-4 U-Net, 256 "
    "images) breaks the model and trips the defense gates. 'verdict' per model is the combined score's level "
    "(gates aside) with the shipped thresholds, lifted to suspicious by a trigger that counts (trigger_counts); "
    "'audit_verdict' is what the audit reported.",
    "Per model, 'backdoored' is by construction (the model was trained on poisoned data) and 'implanted' says whether "
    "its own trigger works (true ASR >= 50%). Eleven poisoned models did not even on the ladder's last rung (five "
    "WaNet, six LC; 'not_implanted' per split): they are left out of the fit and of the headline figures, and "
    "counted in 'all_poisoned'.",
    "Scored with the shipped coefficients (auditor/detection/combined.py), fitted on the calibration split at 3faa0fe "
    "(22 models: 12 clean, 10 working backdoors); fitted_on_calibration is the same fit recomputed from the saved "
    "audits.",
    "The registry's resnet18 is not in the zoo: one training step of a batch of 128 took 4.3 s on one core, "
    "~10 min per model at the zoo's budget. The zoo's three architectures are the registry's small_cnn "
    "(safetensors, widths 8-24) and two the registry does not know, uploaded as TorchScript (lenet, mlp_conv).",
    "Figures are from few models (14 poisoned and 12 clean in calibration, twice that in development and held out). "
    "When a split separates perfectly the percentile bootstrap interval of its ROC-AUC collapses to [1, 1]: it says "
    "this sample separates, not that every model would. 0 false positives of 24 clean models bounds the rate only "
    "below 14% (95%); the fit saw no working WaNet or LC backdoor and the held-out split has two working WaNet models "
    "and one working LC.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, default=DEFAULT_OUT, help="bench/zoo.py's --out")
    p.add_argument("--effort", default="quick")
    p.add_argument("--split", choices=SPLITS, default=None)
    p.add_argument("--models", default="", help="comma-separated subset")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/detection_fmnist"))
    p.add_argument("--analyse-only", action="store_true")
    p.add_argument("--readings-from", type=Path, default=None,
                   help="start from the per-model readings of a results file this benchmark wrote (and "
                        "bench/results/zoo_manifest.json): with --analyse-only no zoo is needed; models audited "
                        "in --work-dir join them (a later build), replacing a model's reading from the file")
    p.add_argument("--no-wait", action="store_true", help="audit what the zoo has now instead of waiting for the rest")
    p.add_argument("--refit", action="store_true", help="score with the coefficients fitted now, not the shipped ones")
    p.add_argument("--blackbox-labels", action="store_true",
                   help="also audit every model as a label-only API on loopback (fills heldout.blackbox_labels)")
    p.add_argument("--out", type=Path, default=RESULTS / "detection_fmnist.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
