"""The audit plan: one resolved set of numbers, sound or refused before any work."""

from __future__ import annotations

import pytest
import torch

from auditor.blackbox import DistillConfig, RefitConfig
from auditor.data import ImageSet
from auditor.errors import AuditError, ErrorCode
from auditor.pipeline import FASHION_MNIST, STAGES, plan_audit, upload_summary
from auditor.pipeline.data import stratified_take
from auditor.pipeline.describe import describe_plan
from auditor.pipeline.plan import API_EVALUATION_IMAGES, EFFORTS, MIN_DISTILL_QUERIES
from auditor.pipeline.refine import refine_config
from auditor.spec import parse_spec

README_API = {"model": {"source": "api", "api": {"url": "http://127.0.0.1:9000/v1/models/model:predict",
                                                   "output": "labels", "query_budget": 20_000}}}


def api_spec(budget: int = 20_000, effort: str = "standard", **extra) -> dict:
    spec = {"effort": effort, "model": {"source": "api", "api": {**README_API["model"]["api"], "query_budget": budget}}}
    for section, values in extra.items():
        spec[section] = values
    return spec


def test_the_readme_black_box_example_resolves_to_a_sound_plan():
    plan = plan_audit(parse_spec(README_API), FASHION_MNIST)

    q = plan.queries
    assert plan.effort == "standard" and plan.stages == STAGES
    assert q.distillation >= MIN_DISTILL_QUERIES  # it used to leave 2 queries here
    assert plan.data.stratified and plan.data.test_images == API_EVALUATION_IMAGES == 2401
    assert q.evaluation == 2 * 2401
    assert plan.probes.images >= plan.probes.min_images == 100
    assert q.refits > 0 and plan.surrogate.refit_rounds == 5
    assert q.distillation + q.refits + q.evaluation + q.probes + q.detection + q.unallocated == 20_000
    assert plan.surrogate.distill_queries == q.distillation and plan.surrogate.refit_queries == q.refits


def test_a_budget_below_the_minimum_is_refused_with_the_minimum_that_works():
    with pytest.raises(AuditError) as refused:
        plan_audit(parse_spec(api_spec(budget=12_000)), FASHION_MNIST)

    error = refused.value
    assert error.code is ErrorCode.INSUFFICIENT_QUERY_BUDGET and error.is_input_error
    needed = error.detail["needed"]
    assert needed > 12_000 and f"{needed:,}" in error.message and "data.test_size" in error.message
    plan = plan_audit(parse_spec(api_spec(budget=needed)), FASHION_MNIST)  # exactly the minimum is enough
    assert plan.queries.distillation >= MIN_DISTILL_QUERIES


def label_only_api_spec(budget: int) -> dict:
    spec = api_spec(budget=budget)
    spec["model"]["api"]["label_only_detection"] = True
    return spec


def test_label_only_detection_is_off_unless_asked_for():
    """Uncalibrated evidence never takes queries from the surrogate of an audit that did not ask for it."""
    plan = plan_audit(parse_spec(api_spec(budget=60_000)), FASHION_MNIST)
    assert plan.label_only is None and plan.queries.detection == 0
    assert not any("label-only" in note.lower() for note in plan.notes)


def test_label_only_detection_takes_what_the_minimum_audit_leaves_up_to_its_share():
    """At the default budget the minimum audit leaves too little: skipped with the budget that would run it."""
    skipped = plan_audit(parse_spec(label_only_api_spec(20_000)), FASHION_MNIST)
    assert skipped.label_only is None and skipped.queries.detection == 0
    assert any("No label-only trigger detection" in note for note in skipped.notes)
    with pytest.raises(AuditError) as refused:
        plan_audit(parse_spec(label_only_api_spec(12_000)), FASHION_MNIST)
    with_detection = refused.value.detail["with_detection"]
    assert with_detection > refused.value.detail["needed"] and f"{with_detection:,}" in refused.value.message

    plan = plan_audit(parse_spec(label_only_api_spec(with_detection)), FASHION_MNIST)
    q, lo = plan.queries, plan.label_only
    assert lo is not None and q.detection == lo.queries <= EFFORTS["standard"].label_only_queries == 5000
    assert q.distillation >= MIN_DISTILL_QUERIES and plan.estimate_seconds["detect"] > 0
    assert q.distillation + q.refits + q.evaluation + q.probes + q.detection + q.unallocated == with_detection
    assert plan_audit(parse_spec(label_only_api_spec(with_detection - 1)), FASHION_MNIST).label_only is None
    rows = dict(describe_plan(plan))
    assert "label-only detection 4,750" in rows["Queries"]
    assert "does not move the verdict" in rows["Label-only detection"]
    large = plan_audit(parse_spec(label_only_api_spec(60_000)), FASHION_MNIST)
    assert large.queries.detection == lo.queries  # never more than the effort's share, however large the budget


def test_lowering_the_test_size_lowers_the_minimum_by_two_queries_per_image():
    def needed(test_size: int | None) -> int:
        data = {"test_size": test_size} if test_size else {}
        with pytest.raises(AuditError) as refused:
            plan_audit(parse_spec(api_spec(budget=100, data=data)), FASHION_MNIST)
        return refused.value.detail["needed"]

    assert needed(None) - needed(1401) == 2 * (2401 - 1401)


def test_thorough_effort_needs_more_than_the_default_budget():
    with pytest.raises(AuditError) as refused:
        plan_audit(parse_spec(api_spec(effort="thorough")), FASHION_MNIST)
    assert refused.value.code is ErrorCode.INSUFFICIENT_QUERY_BUDGET


def test_explicit_numbers_are_honoured_or_refused_never_shrunk():
    plan = plan_audit(parse_spec(api_spec(budget=60_000, probes={"images": 300}, data={"test_size": 4000})),
                      FASHION_MNIST)
    assert (plan.probes.images, plan.data.test_images, plan.data.stratified) == (300, 4000, False)
    with pytest.raises(AuditError) as refused:
        plan_audit(parse_spec(api_spec(probes={"images": 1000})), FASHION_MNIST)
    assert refused.value.code is ErrorCode.INSUFFICIENT_QUERY_BUDGET


def test_a_pool_smaller_than_one_batch_trains_in_one_smaller_batch():
    plan = plan_audit(parse_spec({"effort": "tiny", "refine": {"pool_size": 64}}), FASHION_MNIST)
    assert (plan.refine.pool_images, plan.refine.batch_size) == (64, 64)
    assert refine_config(plan).batch_size == 64  # RefineConfig accepts it (it refused pool < batch before)


def test_a_control_target_outside_the_classes_is_refused_up_front():
    with pytest.raises(AuditError) as refused:
        plan_audit(parse_spec({"controls": {"target": 12}}), FASHION_MNIST)
    assert refused.value.code is ErrorCode.INVALID_SPEC
    assert refused.value.detail["fields"][0]["field"] == "controls.target"


def test_unlabelled_upload_needs_the_class_count():
    data = upload_summary(500, (1, 16, 16), None, False, 0.2)
    with pytest.raises(AuditError) as refused:
        plan_audit(parse_spec({"data": {"source": "upload"}}), data)
    assert refused.value.detail["fields"][0]["field"] == "model.architecture.num_classes"
    plan = plan_audit(parse_spec({"data": {"source": "upload"}, "model": {"architecture": {"num_classes": 4}}}), data)
    assert (plan.data.num_classes, plan.data.pool_images, plan.data.test_images) == (4, 400, 100)


def test_efforts_have_named_fields_and_plans_record_every_number():
    assert EFFORTS["standard"].refine_epochs == 6 and EFFORTS["tiny"].unet_width == 8
    plan = plan_audit(parse_spec({"effort": "quick"}), FASHION_MNIST)
    assert plan.refine.epochs == EFFORTS["quick"].refine_epochs
    assert plan.controls.attacks == ("badnets", "blended")
    c = plan.controls  # the whole schedule over the effort's 20,000 pool images
    assert (c.train_images, c.holdout_images, c.stop_rule) == (20_000, 0, "fixed")
    assert c.max_steps == c.epochs * 157
    c = plan_audit(parse_spec({"effort": "quick", "controls": {"stop_rule": "implanted"}}), FASHION_MNIST).controls
    assert (c.train_images, c.holdout_images, c.stop_rule) == (18_000, 2000, "implanted")  # the rule's held-out split
    assert c.max_steps == c.epochs * 141 and c.check_every == 423 // 8 and (c.min_asr, c.ba_tolerance, c.cooldown_share) == (0.9, 0.01, 1.0)
    assert plan.surrogate is None and plan.queries is None and "surrogate" not in plan.stages
    assert plan.to_dict()["controls"]["attacks"] == ["badnets", "blended"]  # JSON-ready


def test_the_defended_model_is_probed_with_the_strongest_probes_only():
    checkpoint = plan_audit(parse_spec({"effort": "standard"}), FASHION_MNIST).probes
    api = plan_audit(parse_spec(README_API), FASHION_MNIST).probes

    assert (checkpoint.battery, checkpoint.after_probes) == ("full", 20) and checkpoint.probes > 100
    assert (api.battery, api.after_probes) == ("api", 5) and api.probes > api.after_probes


def test_time_estimates_weight_the_planned_stages():
    checkpoint = plan_audit(parse_spec({"effort": "standard"}), FASHION_MNIST)
    api = plan_audit(parse_spec(README_API), FASHION_MNIST)

    for plan in (checkpoint, api):
        weights = plan.stage_weights()
        assert list(weights) == list(plan.stages) and sum(weights.values()) == pytest.approx(1.0)
        assert max(weights, key=weights.get) in ("refine", "evaluate")
    assert api.estimate_seconds["surrogate"] > 0
    rows = dict(describe_plan(api))
    assert rows["Queries"].startswith("20,000:") and "Estimated time" in rows


def test_distillation_and_refit_configs_take_the_plans_numbers():
    plan = plan_audit(parse_spec(README_API), FASHION_MNIST)
    assert DistillConfig(query_budget=plan.surrogate.distill_queries).query_budget == plan.queries.distillation
    assert RefitConfig(query_budget=plan.surrogate.refit_queries).rounds == plan.surrogate.refit_rounds
    with pytest.raises(TypeError):
        DistillConfig()  # no second default budget to drift from the plan's


def test_stratified_subsample_keeps_each_class_share():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    data = ImageSet(torch.zeros(1000, 1, 8, 8, dtype=torch.uint8), y)
    sample = stratified_take(data, 100, seed=3)
    assert len(sample) == 100
    assert torch.bincount(sample.y).tolist() == [60, 30, 10]


def test_the_pipeline_imports_no_web_queue_or_database_library():
    import subprocess
    import sys

    code = ("import sys, auditor.pipeline, auditor.pipeline.run; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'flask', 'celery', 'sqlalchemy', 'boto3', 'redis', 'werkzeug'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_controls_train_their_whole_schedule_by_default_and_on_request_until_implanted():
    standard = plan_audit(parse_spec({"effort": "standard"}), FASHION_MNIST).controls
    assert (standard.stop_rule, standard.holdout_images, standard.train_images) == ("fixed", 0, 60_000)
    assert standard.max_steps == 4 * 469 and standard.cooldown_share == 0.0
    ruled = plan_audit(parse_spec({"effort": "standard", "controls": {"stop_rule": "implanted"}}), FASHION_MNIST)
    c = ruled.controls
    assert c.train_images + c.holdout_images == FASHION_MNIST.pool_images and c.holdout_images == 2000
    assert c.max_steps == 4 * 454 and c.check_every == 100 and c.stop_rule == "implanted"
    tiny = plan_audit(parse_spec({"effort": "tiny", "data": {"train_size": 200},
                                  "controls": {"stop_rule": "implanted"}}), FASHION_MNIST).controls
    assert (tiny.stop_rule, tiny.holdout_images, tiny.train_images) == ("fixed", 0, 200)  # 40 would be noise
    assert tiny.cooldown_share == 0.0
    assert tiny.check_every >= 1


def test_refine_trains_on_overlaid_images_only_when_the_spec_asks():
    by_effort = {e: plan_audit(parse_spec({"effort": e}), FASHION_MNIST).refine.overlay for e in EFFORTS}
    assert by_effort == {"tiny": 0.0, "quick": 0.0, "standard": 0.0, "thorough": 0.0}
    assert "overlaid" not in dict(describe_plan(plan_audit(parse_spec({}), FASHION_MNIST)))["REFINE"]
    plan = plan_audit(parse_spec({"effort": "quick", "refine": {"overlay": 0.3}}), FASHION_MNIST)
    assert plan.refine.overlay == 0.3 and refine_config(plan).overlay == 0.3
    assert "inputs overlaid up to 0.3" in dict(describe_plan(plan))["REFINE"]
    with pytest.raises(Exception, match="overlay"):
        parse_spec({"refine": {"overlay": 0.6}})
