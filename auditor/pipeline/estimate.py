"""How long each stage of a plan should take, from rates measured on this project's benchmarks.

The rates are seconds per unit of work on one CPU core with bf16 autocast (the
benchmark machine's setting), each with the run it comes from. Other settings
scale them: no native bf16 costs about 2x for the U-Net and 1.5x for the CNNs
(auditor/runtime.py); a GPU is faster, so there the estimate is an upper bound.
The worker weights its progress bar with these estimates, and ``--plan`` and the
REST dry run show them, so they only need to be right to within a factor, not to
the second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auditor.pipeline.budget import QueryPlan
    from auditor.pipeline.plan import ControlsPlan, DataPlan, DetectionPlan, ProbePlan, RefinePlan, SurrogatePlan

#: REFINE, U-Net width 16: 452 s mean for 6 epochs x 20,000 images over the seven attacks of
#: bench/results/refine_fmnist.json (356.8-558.5 s). The U-Net's cost grows with the square of its width.
REFINE_S_PER_IMAGE_EPOCH_W16 = 3.77e-3
#: Small-CNN training (positive controls, surrogates): 215 s mean for 4 epochs x 60,000 images, the six attacks of
#: bench/results/refine_fmnist.json trained in 4 epochs (192.6-276.4 s, poisoning included).
CNN_S_PER_IMAGE_EPOCH = 0.90e-3
#: Positive controls a spec stops by the implant rule (``controls.stop_rule: implanted``): the rule held at step 600 (BadNets) and 500 (Blended) of a
#: 2,724-step cap at standard effort (bench/results/control_implant_rule.json), then the cool-down adds its share.
CONTROL_RULE_HOLDS_STEPS = 550
#: The label-consistent attack's PGD poisoning: 827.7 s for 8 epochs there, 1.9x the others' per-epoch rate.
SLOW_ATTACKS = {"lc": 1.9}
#: One probed image through a local model, probe applied: 91.2 s for 500 images x 159 predictions
#: (bench/results/suspicion_fmnist.json, clean-s0-w32).
PROBE_S_PER_PREDICTION = 1.15e-3
#: One image answered by the reference server over loopback HTTP (ModelServer, KServe v1, label-only, the client's
#: default batches of 64): 2,000 Fashion-MNIST test images took 11.25 s with the machine at load average 18 (measured
#: for this estimate while other jobs ran; a quiet machine answers faster, so it errs long).
QUERY_S_PER_IMAGE = 5.6e-3
#: Trigger reverse-engineering: one stamped image through the model and back (fp32): 26.8 s for 60 steps x 10 classes
#: x 32 images on a small CNN of width 32 (Fashion-MNIST shape), one core, measured for this estimate with the
#: machine at load average 4.7 on two cores (a quiet machine is faster, so it errs long).
DETECT_S_PER_STAMPED_IMAGE = 1.4e-3
#: Local predictions for BA and agreement (small CNN, batches of 512): negligible next to the rest.
PREDICT_S_PER_IMAGE = 0.1e-3
#: Stages with a near-fixed cost: reading Fashion-MNIST, loading or tracing a model, writing HTML, PDF and plots.
DATA_S = 2.0
DATA_S_PER_UPLOADED_IMAGE = 50e-6  # decoding an uploaded archive
LOAD_S = 1.0
REPORT_S = 10.0
#: Without native bf16 (autocast emulated or off): the U-Net roughly halves in speed, the CNNs lose a third.
NO_BF16_FACTOR = {"unet": 2.0, "cnn": 1.5}


def estimate_stage_seconds(*, stages: tuple[str, ...], data: DataPlan, refine: RefinePlan, probes: ProbePlan,
                           controls: ControlsPlan, surrogate: SurrogatePlan | None, queries: QueryPlan | None,
                           bf16: bool, device: str, detection: DetectionPlan | None = None) -> dict[str, float]:
    """Seconds per stage on one CPU core (an upper bound on a GPU)."""
    unet = REFINE_S_PER_IMAGE_EPOCH_W16 * (refine.unet_width / 16) ** 2 * (1.0 if bf16 else NO_BF16_FACTOR["unet"])
    cnn = CNN_S_PER_IMAGE_EPOCH * (1.0 if bf16 else NO_BF16_FACTOR["cnn"])
    api = surrogate is not None
    refine_one = refine.epochs * refine.pool_images * unet
    seconds = {
        "data": DATA_S + (data.pool_images + data.test_images) * DATA_S_PER_UPLOADED_IMAGE * (data.source == "upload"),
        "load": LOAD_S,
        "refine": refine_one + (_refit_seconds(surrogate, cnn) if api else 0.0),
        "evaluate": _evaluate_seconds(data, probes, controls, refine_one, cnn, api),
        "report": REPORT_S,
    }
    if api:
        seconds["surrogate"] = _distill_seconds(surrogate, cnn)
    if detection is not None:
        stamped = detection.steps * data.num_classes * detection.batch_size + detection.holdout_images
        seconds["detect"] = stamped * DETECT_S_PER_STAMPED_IMAGE
    if queries is not None and queries.detection:
        # The label-only search on the API: its queries, one to a few images per request.
        seconds["detect"] = seconds.get("detect", 0.0) + queries.detection * QUERY_S_PER_IMAGE
    return {stage: round(seconds.get(stage, 0.0), 1) for stage in stages}


def _distill_seconds(surrogate: SurrogatePlan, cnn: float) -> float:
    """Queries, a preliminary model on the first half (half the epochs), then the surrogate itself."""
    d = surrogate.distill_queries
    return d * QUERY_S_PER_IMAGE + (surrogate.distill_epochs * d + surrogate.distill_epochs // 2 * d / 2) * cnn


def _refit_seconds(surrogate: SurrogatePlan, cnn: float) -> float:
    """Each round fine-tunes 2 epochs on the distilled images plus every transformed image answered so far."""
    if not surrogate.refit_rounds:
        return 0.0
    per_round = surrogate.refit_queries / surrogate.refit_rounds
    tuning = sum(2 * (surrogate.distill_queries + per_round * (i + 1)) for i in range(surrogate.refit_rounds))
    return surrogate.refit_queries * QUERY_S_PER_IMAGE + tuning * cnn


def _evaluate_seconds(data: DataPlan, probes: ProbePlan, controls: ControlsPlan, refine_one: float, cnn: float,
                      api: bool) -> float:
    per_query = QUERY_S_PER_IMAGE if api else PREDICT_S_PER_IMAGE
    utility = 2 * data.test_images * per_query
    probing = probes.images * (probes.probes + probes.after_probes + 2) * (QUERY_S_PER_IMAGE if api else PROBE_S_PER_PREDICTION)
    per_control = controls.epochs * controls.train_images * cnn * _control_step_share(controls)
    # Each control is a local model defended with the same REFINE settings as the submitted one.
    trained = sum(per_control * SLOW_ATTACKS.get(a, 1.0) + refine_one for a in controls.attacks)
    return utility + probing + trained


def _control_step_share(controls: ControlsPlan) -> float:
    """The expected share of the cap a control trains: all of it on a fixed schedule."""
    if controls.stop_rule != "implanted" or not controls.max_steps:
        return 1.0
    return min(1.0, CONTROL_RULE_HOLDS_STEPS * (1 + controls.cooldown_share) / controls.max_steps)
