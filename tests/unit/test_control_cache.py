"""Positive controls reused, not retrained: the cache's entries, and audits that share them.

The audits run the real pipeline (tiny Fashion-MNIST subsets) through ``run_with_control_cache``,
the wrapper the worker and the CLI put around ``run_audit``, on a local-folder artifact store.
Nothing of ours is mocked: the report says whether each control was trained or reused, and a
reused control's training time is zero because no training ran.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from auditor.models import ArchConfig, build_classifier, save_classifier
from auditor.pipeline import AuditInputs, run_audit
from auditor.pipeline import cache as cc
from auditor.report import report_json_schema
from auditor.spec import parse_spec
from auditor.store.artifacts import LocalStore
from auditor.store.control_cache import may_publish, run_with_control_cache

#: Real stages at the smallest size that still trains a control and its REFINE defense.
SPEC = {"effort": "tiny", "data": {"train_size": 300, "test_size": 100},
        "controls": {"attacks": ["badnets"], "stop_rule": "implanted"}, "probes": {"images": 20}}
KEY = f"{'a' * 32}/{'b' * 32}/control"


# -- entries -------------------------------------------------------------------------------------------------------


def _payload(tmp_path: Path) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path))
    return path


def test_an_entry_reads_back_verified_and_a_tampered_or_truncated_one_is_discarded(tmp_path, caplog):
    cache = cc.ControlCache(tmp_path / "cache", "audit-1")
    written = cache.write(KEY, {"model.safetensors": _payload(tmp_path)}, {"seed": 0}, {"poisoned_count": 3})
    assert written is not None and written.provenance["audit_id"] == "audit-1"
    entry = cache.read(KEY)
    assert entry is not None and entry.manifest["poisoned_count"] == 3

    model = entry.file("model.safetensors")
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="auditor.pipeline.cache"):
        assert cache.read(KEY) is None
    assert "sha256" in cache.rejected[KEY] and "rejected" in caplog.text
    assert not cache.entry_dir(KEY).exists()  # discarded, for the caller to rebuild

    cache.write(KEY, {"model.safetensors": _payload(tmp_path)}, {}, {})
    model.write_bytes(model.read_bytes()[:-10])
    assert cache.read(KEY) is None and "truncated" in cache.rejected[KEY]

    cache.write(KEY, {"model.safetensors": _payload(tmp_path)}, {}, {})
    other = f"{'c' * 32}/{'b' * 32}/control"
    cache.entry_dir(other).parent.mkdir(parents=True)
    cache.entry_dir(KEY).rename(cache.entry_dir(other))  # an entry moved under another key
    assert cache.read(other) is None and "another key" in cache.rejected[other]


def test_keys_cover_what_a_control_depends_on():
    from auditor.pipeline.plan import FASHION_MNIST, plan_audit

    spec = parse_spec(SPEC)
    plan = plan_audit(spec, FASHION_MNIST)
    base = cc.control_groups(spec, plan, "0" * 64, labelled=True)["badnets"]
    assert cc.control_groups(spec, plan, "1" * 64, labelled=True)["badnets"] != base  # other data
    reseeded = parse_spec({**SPEC, "seed": 1})
    assert cc.control_groups(reseeded, plan_audit(reseeded, FASHION_MNIST), "0" * 64, True)["badnets"] != base
    longer = parse_spec({**SPEC, "controls": {"attacks": ["badnets"], "train_epochs": 2}})
    assert cc.control_groups(longer, plan_audit(longer, FASHION_MNIST), "0" * 64, True)["badnets"] != base
    assert cc.control_groups(spec, plan, "0" * 64, labelled=False) == {}  # pseudo-labels: never cached
    for rule in ({"stop_rule": "fixed"}, {"min_asr": 0.8}, {"ba_tolerance": 0.02}, {"check_every": 3},
                 {"holdout_images": 10}, {"cooldown_share": 0.25}):  # the stopping rule decides the weights as much as the epochs do
        stopped_otherwise = replace(plan, controls=replace(plan.controls, **rule))
        assert cc.control_groups(spec, stopped_otherwise, "0" * 64, True)["badnets"] != base, rule
    narrow, wide = ArchConfig("small_cnn", width=4), ArchConfig("small_cnn", width=8)
    assert cc.control_key(base, narrow) != cc.control_key(base, wide)


# -- audits sharing a local-folder store ---------------------------------------------------------------------------


def _audit(tmp_path: Path, name: str, store: LocalStore, model: Path, **changes: dict) -> dict:
    inputs = AuditInputs(tmp_path / name, model_path=model, audit_id=name, device="cpu")
    result = run_with_control_cache(run_audit, store, parse_spec({**SPEC, **changes}), inputs)
    assert result.status == "succeeded", result.error
    jsonschema.validate(result.report, report_json_schema())
    assert not (tmp_path / name / "control-cache").exists()  # the local copy goes once published
    return result.report


def _control(report: dict) -> dict:
    (control,) = report["positive_controls"]
    return control


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    arch = ArchConfig("small_cnn", width=4)
    return save_classifier(build_classifier(arch), arch, tmp_path / "model.safetensors")


def test_a_second_audit_reuses_the_cached_control_and_a_tampered_entry_is_detected_and_rebuilt(
        tmp_path, model_file, caplog):
    store = LocalStore(tmp_path / "artifacts")

    first = _control(_audit(tmp_path, "first", store, model_file))
    assert first["origin"] == "trained" and first["cache"]["refine_origin"] == "trained"
    assert first["train_seconds"] > 0 and first["refine_seconds"] > 0
    trained = first["training"]
    assert trained["stop_rule"] == "implanted" and 0 < trained["steps"] <= trained["max_steps"]
    assert trained["holdout_images"] == 60 and trained["holdout_ba"] is not None
    key, refine_key = first["cache"]["key"], first["cache"]["refine_key"]
    entry = tmp_path / "artifacts" / cc.STORE_PREFIX / key
    manifest = json.loads((entry / cc.MANIFEST).read_text())
    assert manifest["created_by"]["audit_id"] == "first" and manifest["inputs"]["attack"]["name"] == "badnets"

    second = _control(_audit(tmp_path, "second", store, model_file))
    assert second["origin"] == "reused" and second["cache"]["refine_origin"] == "reused"
    assert (second["cache"]["key"], second["cache"]["refine_key"]) == (key, refine_key)
    assert second["cache"]["created_by"] == "first"
    assert second["train_seconds"] == 0.0 and second["refine_seconds"] == 0.0  # nothing was trained
    assert second["training"] == trained  # how the cached control was trained, from its manifest
    assert second["no_defense"] == first["no_defense"] and second["refine"] == first["refine"]  # re-scored alike
    html = (tmp_path / "second" / "out" / "report.html").read_text()
    assert "reused from audit first" in html and f"{trained['steps']:,} of {trained['max_steps']:,}" in html

    other_refine = _control(_audit(tmp_path, "other-refine", store, model_file, refine={"epochs": 2}))
    assert other_refine["origin"] == "reused" and other_refine["train_seconds"] == 0.0
    assert other_refine["cache"]["refine_origin"] == "trained" and other_refine["refine_seconds"] > 0
    assert other_refine["cache"]["refine_key"] != refine_key  # a second REFINE entry beside the same control

    model = entry / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="auditor.store.control_cache"):
        third = _control(_audit(tmp_path, "third", store, model_file))
    assert f"control cache entry {key} failed verification" in caplog.text
    assert third["origin"] == "trained" and third["train_seconds"] > 0  # rebuilt, not trusted
    rebuilt = json.loads((entry / cc.MANIFEST).read_text())
    assert rebuilt["created_by"]["audit_id"] == "third"
    cc.verify_entry(entry, key)  # the store holds a sound entry again


def test_the_cli_puts_the_cache_around_its_runner_unless_turned_off(tmp_path):
    from auditor.cli import _with_control_cache
    from auditor.settings import Settings

    on = Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_CONTROL_CACHE": "on"})
    wrapped = _with_control_cache(on, run_audit)
    assert wrapped.func is run_with_control_cache and wrapped.args[0] is run_audit
    assert isinstance(wrapped.args[1], LocalStore) and wrapped.args[1].root == tmp_path / "artifacts"
    off = Settings.from_env({"REFINE_AUDIT_DATA_DIR": str(tmp_path), "REFINE_AUDIT_CONTROL_CACHE": "off"})
    assert _with_control_cache(off, run_audit) is run_audit


def test_only_audits_that_ran_no_submitted_code_publish_controls(tmp_path: Path) -> None:
    arch = ArchConfig("small_cnn", num_classes=10, width=4)
    weights = save_classifier(build_classifier(arch).eval(), arch, tmp_path / "m.safetensors")
    program = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(program))
    (tmp_path / "junk.bin").write_bytes(b"not a model")

    def inputs(model_path: Path | None) -> AuditInputs:
        return AuditInputs(work_dir=tmp_path / "work", audit_id="a", model_path=model_path)

    assert may_publish(inputs(weights))  # weights only: nothing of the submitter's runs
    assert may_publish(inputs(None))  # a model API: no model file is loaded at all
    assert not may_publish(inputs(program))  # TorchScript carries a program
    assert not may_publish(inputs(tmp_path / "junk.bin"))  # refused files publish nothing


def test_a_cached_controls_training_record_is_read_only_when_sane(tmp_path):
    """Manifest numbers carry no hash: a tampered one is dropped, never reported (it would fail validation)."""
    from auditor.pipeline.controls import _cached_checks, _cached_count

    def entry(**manifest):
        return cc.Entry(KEY, tmp_path, manifest)

    good = entry(train_steps=1200, max_steps=2724, last_check={"step": 1200, "ba": 0.9, "asr": 0.99})
    assert (_cached_count(good, "train_steps"), _cached_count(good, "max_steps")) == (1200, 2724)
    assert _cached_checks(good) == [{"step": 1200.0, "ba": 0.9, "asr": 0.99}]
    for bad in ({"step": 1, "ba": 5.0, "asr": 0.5}, {"step": 1, "ba": 0.5}, "0.9", None):
        assert _cached_checks(entry(last_check=bad)) == []
    for bad in (-1, "12", True, 1.5, None):
        assert _cached_count(entry(train_steps=bad), "train_steps") == 0
