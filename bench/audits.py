"""What every product-path benchmark does: make a backdoored model, audit it as a user would, measure its trigger.

The audit itself is ``auditor.pipeline.run_audit`` with a spec built from spec fields
only; nothing here wires engine internals together. What a benchmark adds is what an
audit cannot know: the planted trigger. Before and after the defense it is measured
on the submitted model and on what the audit ships (``defended_model.pt`` for a
checkpoint, T and M around the real API for a model API), with a client of its own so
the audit's query budget is untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from auditor.attacks import AttackConfig, BackdooredModel, train_backdoored_model, train_clean_model
from auditor.blackbox import ApiConfig, HttpModelAPI, ModelServer, api_predictor, defended_api_predictor
from auditor.data import ImageSet, load_fashion_mnist, take
from auditor.evaluation import accuracy, attack_metrics, model_predictor, predict_labels
from auditor.evaluation.metrics import asr_and_ra
from auditor.models import ArchConfig, export_torchscript, load_checkpoint
from auditor.deploy import load_defense
from auditor.pipeline import AuditInputs, run_audit
from auditor.settings import Settings
from auditor.spec import parse_spec
from auditor.training import TrainConfig
from bench.common import cpu_features

LOOPBACK = ("127.0.0.1",)
#: The label-consistent attack keeps every label right, so it implants slower: 85.7% ASR after 4 epochs,
#: 94.0% after 8 on the 60k training images (bench/results/refine_fmnist.json).
TRAIN_EPOCHS_BY_ATTACK = {"lc": 8}


@dataclass
class Subject:
    """A model to audit, and what only its maker knows: its trigger (None for a clean model)."""

    name: str
    path: Path  # TorchScript, as a user would upload it
    model: torch.nn.Module
    backdoor: BackdooredModel | None
    train_seconds: float


def fashion_mnist(settings: Settings) -> tuple[ImageSet, ImageSet]:
    return load_fashion_mnist(settings.fmnist_dir, settings.data_dir)


def make_subject(attack: str | None, train: ImageSet, test: ImageSet, *, epochs: int, train_size: int | None,
                 seed: int, folder: Path, device: torch.device, bf16: bool) -> Subject:
    """A small CNN trained on Fashion-MNIST with ``attack`` planted (``refine-audit attack``'s recipe), or clean."""
    started = time.perf_counter()
    arch, data = ArchConfig("small_cnn"), take(train, train_size, seed)
    config = TrainConfig(epochs=TRAIN_EPOCHS_BY_ATTACK.get(attack or "", epochs), bf16=bf16)
    if attack is None:
        model, _ = train_clean_model(arch, data, config, device=device, seed=seed)
        backdoor = None
    else:
        backdoor = train_backdoored_model(arch, data, test, AttackConfig(attack, target=0, seed=seed), config,
                                          device=device, seed=seed)
        model = backdoor.model
    name = attack or "clean"
    (folder / name).mkdir(parents=True, exist_ok=True)
    path = export_torchscript(model, test.x[:2].float() / 255, folder / name / "model.pt")
    return Subject(name, path, model.eval(), backdoor, round(time.perf_counter() - started, 1))


def checkpoint_audit(subject: Subject, spec: dict[str, Any], work_dir: Path, settings: Settings,
                     test: ImageSet, device: torch.device, control_cache: Path | None = None) -> dict[str, Any]:
    """Audit the subject's file as ``refine-audit audit model.pt`` would; score its trigger on the defended model.

    ``control_cache``: a folder of positive controls shared by the audits, as the CLI's cache
    is (None: every control trained).
    """
    result = run_audit(parse_spec(spec), _inputs(work_dir, settings, control_cache, model_path=subject.path))
    run = _run(result, spec)
    if result.status == "succeeded" and subject.backdoor is not None:
        defended = load_checkpoint(result.out_dir / "defended_model.pt").module.to(device)
        _add_trigger(run, model_predictor(subject.model, device), model_predictor(defended, device), test, subject)
    return run


def api_audit(subject: Subject, spec: dict[str, Any], output: str, work_dir: Path, settings: Settings,
              test: ImageSet, device: torch.device, control_cache: Path | None = None) -> dict[str, Any]:
    """Serve the subject over KServe v1 on loopback and audit its URL; score its trigger through M ∘ API ∘ T.

    ``test`` is where the trigger is scored, each image twice through the API (raw and
    through T), so callers pass a seeded subset of the test split.
    """
    with ModelServer(subject.model, protocol="v1", labels_only=output == "labels") as server:
        url = server.url + "/v1/models/model:predict"
        api_spec = {**spec, "model": {"source": "api", "api": {**spec.get("model", {}).get("api", {}), "url": url,
                                                                 "output": output}}}
        result = run_audit(parse_spec(api_spec), _inputs(work_dir, settings, control_cache))
        run = _run(result, api_spec)
        run["queries_served"] = server.stats()["queries"]
        if result.status == "succeeded" and subject.backdoor is not None:
            defense = load_defense(result.out_dir)
            transform, mapping = defense.transform, defense.mapping
            config = ApiConfig(url=url, num_classes=10, output=output, query_budget=None, batch_size=256)
            with HttpModelAPI(config, allowed_hosts=LOOPBACK) as own_client:  # outside the audit's budget
                _add_trigger(run, api_predictor(own_client),
                             defended_api_predictor(own_client, transform, mapping, device), test, subject)
    return run


def _inputs(work_dir: Path, settings: Settings, control_cache: Path | None = None, **files: Path) -> AuditInputs:
    return AuditInputs(work_dir, allowed_hosts=(*settings.allowed_hosts, *LOOPBACK), device=settings.device,
                       fmnist_dir=settings.fmnist_dir, cache_dir=settings.data_dir, control_cache=control_cache,
                       **files)


def _add_trigger(run: dict[str, Any], submitted, defended, test: ImageSet, subject: Subject) -> None:
    """The planted trigger's ASR and RA before and after, beside the audit's own BA figures.

    Also each side's ``clean_to_target``: the share of *clean* non-target test images sent to the
    target class. It is the floor an ASR cannot go below (confusions between similar classes, such
    as shirts and T-shirts), so a residual ASR near it is no backdoor left; and the residual ASR per
    true class (``asr_by_class``), which shows where a trigger survives when it does.
    """
    bd = subject.backdoor
    target = bd.attack.target
    triggered = bd.attack.triggered_test(test)
    for side, predict in (("before", submitted), ("after", defended)):
        clean_pred, triggered_pred = predict_labels(predict, test), predict_labels(predict, triggered)
        asr, ra = asr_and_ra(triggered_pred, triggered.y, target)
        run[side].update(asr=asr, ra=ra, trigger_ba=accuracy(clean_pred, test.y),
                         clean_to_target=_share_sent_to(clean_pred, test.y, target),
                         asr_by_class=_sent_to_by_class(triggered_pred, triggered.y, target))
    run["trigger_test_images"] = len(test)


def _share_sent_to(pred: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """Of the images whose true class is not ``target``, the share predicted as ``target``."""
    keep = labels != target
    return (pred[keep] == target).float().mean().item()


def _sent_to_by_class(pred: torch.Tensor, labels: torch.Tensor, target: int) -> list[float | None]:
    """Per true class, the share predicted as ``target`` (None for the target itself and for absent classes)."""
    classes = int(labels.max()) + 1
    return [None if c == target or not (labels == c).any() else (pred[labels == c] == target).float().mean().item()
            for c in range(classes)]


def _run(result: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """What the audit itself reports: its plan, per-stage seconds, BA before/after, verdict and gates."""
    report = result.report or {}
    utility = report.get("utility") or {}
    figures = report.get("figures") or {}
    return {
        "status": result.status,
        "error": result.error and {"code": result.error["code"], "message": result.error["message"]},
        "plan": report.get("plan"),
        "seconds": {**(report.get("timings") or {}).get("stages", {})},
        "before": {"ba": utility.get("ba_before"), "asr": None},
        "after": {"ba": utility.get("ba_after"), "asr": None},
        "agreement_clean": (figures.get("surrogate_agreement") or {}).get("value"),
        "defended_agreement": utility.get("agreement"),
        "verdict": (report.get("verdict") or {}).get("level"),
        "gates_tripped": [g["name"] for g in report.get("gates") or [] if g["tripped"]],
        "fit_to_deploy": (report.get("defended_model") or {}).get("fit_to_deploy"),
        "queries_used": (report.get("queries") or {}).get("queries_used"),
        "query_budget": _budget(report, spec),
        "probes": {side: (report.get("probes") or {}).get(side, {}).get("score") for side in ("before", "after")},
        "refine_seconds": (report.get("refine") or {}).get("seconds"),
        "controls": [{"attack": c.get("attack"), "origin": c.get("origin", "trained"),
                      "asr_before": (c.get("no_defense") or {}).get("asr"), "asr_after": (c.get("refine") or {}).get("asr")}
                     for c in report.get("positive_controls") or []],
        "spec": spec,
    }


def _budget(report: dict[str, Any], spec: dict[str, Any]) -> int | None:
    """The budget the audit ran with (the spec's default when it named none); None for checkpoints."""
    queries = (report.get("plan") or {}).get("queries")
    if queries:
        return queries["budget"]
    return ((spec.get("model") or {}).get("api") or {}).get("query_budget")


def environment() -> dict[str, Any]:
    """Machine state a timing depends on: recorded beside every run."""
    return {"load_average_1m": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
            "cpu_features": cpu_features()}


def shipped_trigger_asr(out_dir: Path, subject: Subject, test: ImageSet, device: torch.device) -> float:
    """The planted trigger's ASR on the defended model a checkpoint audit wrote (``defended_model.pt``)."""
    defended = load_checkpoint(out_dir / "defended_model.pt").module.to(device)
    return _trigger_asr(model_predictor(defended, device), test, subject)


def api_trigger_asr(out_dir: Path, subject: Subject, url: str, output: str, test: ImageSet,
                    device: torch.device) -> float:
    """The planted trigger's ASR through M ∘ API ∘ T, with the T and M an API audit wrote, on a client of our own."""
    defense = load_defense(out_dir)
    config = ApiConfig(url=url, num_classes=10, output=output, query_budget=None, batch_size=256)
    with HttpModelAPI(config, allowed_hosts=LOOPBACK) as own_client:  # outside the audit's budget
        return _trigger_asr(defended_api_predictor(own_client, defense.transform, defense.mapping, device), test,
                            subject)


def _trigger_asr(predict: Any, test: ImageSet, subject: Subject) -> float:
    bd = subject.backdoor
    assert bd is not None, "a clean subject has no trigger"
    return attack_metrics(predict, test, bd.attack.triggered_test(test), bd.attack.target).asr
