"""Property: any spec the AuditSpec schema admits, planned against small data, gives a sound plan or a 4xx error.

Specs are drawn from the schema itself (``spec_json_schema``), so a field added to the
spec is exercised without touching this test. Whatever is drawn, planning must end in
an ``AuditPlan`` whose numbers every stage can run with, or in an ``AuditError`` whose
code the REST API answers with a 4xx status; any other exception is an internal error
waiting to happen in a worker.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from auditor.blackbox import DistillConfig, RefitConfig
from auditor.errors import AuditError
from auditor.pipeline import FASHION_MNIST, DataSummary, plan_audit, upload_summary
from auditor.pipeline.controls import implant_rule
from auditor.pipeline.plan import probe_config
from auditor.pipeline.refine import refine_config
from auditor.spec import parse_spec, spec_json_schema
from auditor.training import TrainConfig
from web.errors import http_status

URLS = ("http://127.0.0.1:9000/v1/models/model:predict", "https://models.example.com/v2/models/m/infer")
LARGEST_NUMBER = 10**7  # unbounded integers are drawn up to this: far past any data set here


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A strategy for JSON values valid under ``schema`` (the subset of JSON Schema pydantic emits)."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return _object(schema, defs)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=schema.get("maxItems", 4), unique=True)
    if kind == "integer":
        return st.integers(schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1),
                           schema.get("maximum", LARGEST_NUMBER))
    if kind == "number":
        return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")),
                         schema.get("maximum", schema.get("exclusiveMaximum")),
                         exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "string":
        if schema.get("format") == "uri":
            return st.sampled_from(URLS)
        return st.text(max_size=min(schema.get("maxLength", 20), 20))
    return st.nothing()


def _object(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {k: from_schema(v, defs) for k, v in properties.items() if k in required},
        optional={k: from_schema(v, defs) for k, v in properties.items() if k not in required},
    )


SCHEMA = spec_json_schema()
DEFS = SCHEMA.get("$defs", {})
#: Half of the draws keep the model section as drawn; the other half describe a model API, whose
#: query budget is where most plans can go wrong (a random model section rarely is a valid one).
SPECS = st.one_of(
    from_schema(SCHEMA, DEFS),
    st.builds(lambda raw, api: {**raw, "model": {"source": "api", "api": api}},
              from_schema(SCHEMA, DEFS), from_schema(DEFS["ApiSpec"], DEFS)),
)


@st.composite
def small_uploads(draw: st.DrawFn, test_fraction: float) -> DataSummary:
    labelled = draw(st.booleans())
    shape = (draw(st.sampled_from([1, 3])), draw(st.integers(8, 40)), draw(st.integers(8, 40)))
    classes = draw(st.integers(2, 12)) if labelled else None
    return upload_summary(draw(st.integers(20, 3000)), shape, classes, labelled, test_fraction)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=SPECS, data=st.data())
def test_any_spec_gives_a_sound_plan_or_a_4xx_error(raw: dict[str, Any], data: st.DataObject) -> None:
    try:
        spec = parse_spec(raw)
        summary = (FASHION_MNIST if spec.data.source == "fashion-mnist"
                   else data.draw(small_uploads(spec.data.test_fraction)))
        plan = plan_audit(spec, summary)
    except AuditError as error:
        event(f"refused: {error.code.value}")
        assert 400 <= http_status(error.code) < 500, error
        assert error.is_input_error, error
        return
    event(f"planned: {plan.source} audit")
    _assert_runnable(plan, summary)


def _assert_runnable(plan, summary: DataSummary) -> None:
    """Every number is one the stages accept: the configs they build from it construct without error."""
    d, r = plan.data, plan.refine
    assert 2 <= d.pool_images <= summary.pool_images and 1 <= d.test_images <= summary.test_images
    assert 2 <= r.batch_size <= r.pool_images <= d.pool_images
    refine_config(plan)
    probe_config(plan.probes.battery == "api", plan.probes.images, plan.seed)
    assert 1 <= plan.probes.images <= d.test_images
    if plan.controls.attacks:
        assert plan.controls.target < d.num_classes
        c = plan.controls
        TrainConfig(epochs=c.epochs, batch_size=c.batch_size)
        assert 1 <= c.train_images and c.train_images + c.holdout_images <= d.pool_images
        assert c.max_steps >= c.epochs and (implant_rule(c) is None) == (c.holdout_images == 0)
    if plan.source == "api":
        q = plan.queries
        assert q.distillation + q.refits + q.evaluation + q.probes + q.detection + q.unallocated == q.budget
        lo = plan.label_only
        assert (lo is None) == (q.detection == 0) and (lo is None or (lo.images_per_class >= 1 and lo.queries ==
                                                                       q.detection))
        assert q.distillation >= min(200, d.pool_images) and min(q.refits, q.unallocated) >= 0
        DistillConfig(query_budget=plan.surrogate.distill_queries)
        if plan.surrogate.refit_queries:
            RefitConfig(query_budget=plan.surrogate.refit_queries, rounds=plan.surrogate.refit_rounds)
    assert plan.total_seconds > 0 and set(plan.estimate_seconds) == set(plan.stages)
