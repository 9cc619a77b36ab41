"""How a model-API audit spends its query budget: the arithmetic behind ``AuditPlan.queries``.

One query is one image sent to the API. An audit spends them on five things, in
this order of priority:

1. **Evaluation**: every scored test image is sent twice, raw (the API's BA) and
   through T (the defended BA), so ``2 × test images``. Left to the effort level,
   the test set is a stratified subsample of 2,401 images: BA within ±2 points at
   95% confidence for any BA (plan.py, ``API_EVALUATION_IMAGES``).
2. **Probes**: each probed image costs one query per probe of the compact battery,
   one per probe re-applied to the defended model, and its two clean answers.
3. **Distillation**: never fewer than the effort's minimum, justified by the
   agreement-versus-queries curve (plan.py, ``MIN_DISTILL_QUERIES``), and never
   more than the pool has distinct images.
4. **Label-only detection** on the API itself (auditor/detection/label_only.py):
   what the first three leave, up to the effort's share (``detection_wanted``), and
   nothing when that cannot pay for its smallest run (``detection_floor``, one image
   per class). It is extra evidence that does not move the verdict yet, so it never
   makes a budget insufficient; the refusal names the budget that would also pay it.
5. **Refits** on T(x) while REFINE trains: ``refit_share`` of the surrogate's
   queries (distillation + refits), kept back from distillation.

Whatever evaluation, probes and detection leave goes to the surrogate, split by
``refit_share``. When the budget cannot cover evaluation, probes and the minimum
surrogate, the plan is refused with ``insufficient_query_budget`` and the budget
that would work; nothing is ever squeezed to a two-query surrogate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import ConfigDict, with_config

from auditor.errors import AuditError, ErrorCode


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class QueryPlan:
    """The budget of one API audit, split by purpose (images sent to the API)."""

    budget: int
    distillation: int
    refits: int
    evaluation: int
    probes: int
    unallocated: int  # left when the pool caps distillation; the client simply never spends it
    detection: int = 0  # label-only trigger detection on the API (0 in plans read back from reports before 2.4)


def split_query_budget(*, budget: int, evaluation_images: int, probe_images: int, probe_queries_per_image: int,
                       pool_images: int, min_distill: int, refit_share: float, effort: str,
                       detection_wanted: int = 0, detection_floor: int = 0) -> QueryPlan:
    """Split ``budget`` as the module docstring says; raises ``insufficient_query_budget`` below the minimum."""
    evaluation = 2 * evaluation_images
    probes = probe_images * probe_queries_per_image
    distill_floor = min(min_distill, pool_images)
    if distill_floor < min_distill:
        raise AuditError(
            ErrorCode.INVALID_SPEC,
            f"data.train_size: the pool has {pool_images:,} images, but effort {effort!r} distils the surrogate "
            f"from at least {min_distill:,} distinct ones.",
            {"fields": [{"field": "data.train_size", "message": f"at least {min_distill} pool images are needed"}]},
        )
    needed = evaluation + probes + surrogate_queries_for(distill_floor, refit_share)
    if budget < needed:
        raise insufficient_budget(budget, needed, effort, evaluation, probes, needed - evaluation - probes,
                                  detection_floor)
    split = QueryPlan(budget=budget, distillation=0, refits=0, evaluation=evaluation, probes=probes, unallocated=0)
    detection = detection_share(budget - needed, detection_wanted, detection_floor)
    return with_detection(split, detection, refit_share, pool_images)


def with_detection(queries: QueryPlan, detection: int, refit_share: float, pool_images: int) -> QueryPlan:
    """``queries`` with ``detection`` reserved and the surrogate given the rest, split by ``refit_share``."""
    surrogate = queries.budget - queries.evaluation - queries.probes - detection
    distillation = min(pool_images, math.floor(surrogate * (1 - refit_share)))
    refits = math.floor(surrogate * refit_share) if refit_share > 0 else 0
    return replace(queries, detection=detection, distillation=distillation, refits=refits,
                   unallocated=surrogate - distillation - refits)


def detection_share(spare: int, wanted: int, floor: int) -> int:
    """Label-only detection's queries: up to ``wanted`` of the ``spare`` above the minimum, 0 below its floor.

    The plan rounds the share down to whole images per class (plan.py ``_label_only_plan``)
    and hands what that leaves back to the surrogate.
    """
    share = min(spare, wanted)
    return share if share >= floor > 0 else 0


def surrogate_queries_for(distillation: int, refit_share: float) -> int:
    """Distillation plus the refits kept back beside it."""
    return math.ceil(distillation / (1 - refit_share))


def insufficient_budget(budget: int, needed: int, effort: str, evaluation: int, probes: int,
                        surrogate: int, detection: int = 0) -> AuditError:
    """``insufficient_query_budget``: the minimum that works, the budget that also runs label-only detection,
    and what to change."""
    with_detection = (f"; {needed + detection:,} also run the label-only trigger detection on the API "
                      f"({detection:,} more)") if detection else ""
    return AuditError(
        ErrorCode.INSUFFICIENT_QUERY_BUDGET,
        f"Effort {effort!r} needs at least {needed:,} queries (evaluation {evaluation:,} + probes {probes:,} + "
        f"surrogate {surrogate:,}){with_detection}; the budget is {budget:,}. Raise model.api.query_budget, or "
        "lower data.test_size (2 queries per test image) or probes.images.",
        {"fields": [{"field": "model.api.query_budget", "message": f"at least {needed} queries are needed"}],
         "budget": budget, "needed": needed, "with_detection": needed + detection,
         "minimum": {"evaluation": evaluation, "probes": probes, "surrogate": surrogate}},
    )
