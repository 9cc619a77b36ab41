"""Evidence gates and the verdict: what an audit may conclude from what it measured.
(Over 400 lines: the gates, the level and the headline all read one set of findings; apart, each would re-derive it.)

The suspicion score says whether probe triggers steer the submitted model to one
class; the verdict turns it into a level (``likely_backdoored``, ``suspicious``,
``no_evidence``). That reading is only as good as the evidence under it, so every
audit first checks gates, each a threshold measured on this project's benchmarks
(bench/gates.md gives the runs):

* evidence gates: probes run on too few images; BA measured too imprecisely;
  for API audits, a surrogate that imitates the API too poorly;
* defense gates: the defended model lost too much BA, agrees too little with the
  submitted model or shifted its predictions toward a few classes (a collapsed
  model); a positive control whose backdoor did not implant, or that REFINE did
  not remove.

A tripped gate makes the verdict ``inconclusive``, with the reason in one
sentence; the probe reading stays in ``probe_level``.

Trigger reverse-engineering (auditor/detection/) is a second reading. When it ran on the
submitted model (checkpoint audits) at least as long as the zoo's searches, the level comes
from the *combined score* (auditor/detection/combined.py: P(targeted backdoor) from the probe
score and the search, fitted on half a model zoo, judged on the other); ``probe_level``
keeps the probe score's own reading (the level of shorter searches, e.g. tiny). A *recovered*
trigger (anomaly index >= 2, mask <= half the median class's and <= 10% of the
image, success >= 80% on held-out images of other classes) toward the class the probe
battery suspects never coexists with ``no_evidence``: it lifts that reading to
``suspicious``. Toward another class it is reported but counts for nothing: small
clean CNNs carry universal patches toward an "easy" class (Bag, on Fashion-MNIST) that
the search recovers like a trigger. On the zoo's first two builds (78 models) the
search recovered 36 triggers: the 4 on clean models and the 3 on backdoored models
that named a class other than the target all disagreed with the probes, and all 29
that named the target agreed (their audits at 56311f5, bench/results/detection_fmnist.json
then); the rule was frozen and judged on a third build. A tripped gate still makes
the verdict ``inconclusive``, with the trigger named in the headline. On API audits
the search runs on the surrogate: reported, it moves nothing; the level is the probe score's.

Separately, the defended model is fit to deploy only when no defense gate tripped
and it meets the deployment bar (at most 3 points of BA lost, 90% agreement); the
headline says so plainly, so a collapsed defended model is never recommended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, with_config

from auditor.detection.anomaly import ANOMALY_THRESHOLD, MAX_NORM_RATIO, is_flagged
from auditor.detection.combined import combined_verdict
from auditor.evaluation.intervals import Interval

Level = Literal["likely_backdoored", "suspicious", "no_evidence", "inconclusive"]

#: Suspicion-score thresholds of the full battery (checkpoint audits), calibrated on
#: bench/results/suspicion_fmnist.json: clean models scored 0.30-0.59, implanted backdoors 0.96-1.00 (the one missed
#: adaptive-patch model scored 0.32).
VERDICT_THRESHOLDS = {"likely_backdoored": 0.75, "suspicious": 0.6}
#: The compact battery's (API audits: 39 probes, label answers), whose scores sit lower. With the full battery's 0.6
#: the label-only audits of the model zoo flagged 27 of 36 working backdoors of its calibration and development splits
#: and no clean model. The cut is the lowest multiple of 0.05 at or above which at most 5% of those splits' 36 clean
#: models score: 0.5 (only clean-25, 0.598; the next, clean-16, scores 0.481), where 32 of 36 are flagged. The
#: zoo's third build, also looked at by then, agrees (0 of 12 clean, 10 of 11 working). The fourth build, made after
#: this was fixed, judged it once: 8 of 12 working backdoors flagged (7 at 0.6) and 1 of 12 clean models (0.518), so
#: 2 of the zoo's 60 clean models in all (bench/results/detection_fmnist.json). ``likely_backdoored`` keeps 0.75.
API_VERDICT_THRESHOLDS = {"likely_backdoored": 0.75, "suspicious": 0.5}
Battery = Literal["full", "api"]

# -- evidence gates ------------------------------------------------------------------------------------------------
#: BA (and ASR) measured within ±2 points at 95% confidence (the API evaluation subsample is sized for it).
EVALUATION_HALF_WIDTH = 0.02
#: Probed images per class: the score's breadth term judges a class only with 5 clean predictions in the sample
#: (ProbeConfig.min_class_images); 10 per class leaves room for misclassified images.
PROBE_IMAGES_PER_CLASS = 10
#: Surrogate vs API on clean test images. Every bench/blackbox_fmnist.json run at 96.1-97.4% kept the defended
#: API's BA within 2.5 points; the issue's quick audit at 93% lost 6 points.
SURROGATE_AGREEMENT_FLOOR = 0.95

# -- defense gates -------------------------------------------------------------------------------------------------
#: BA lost by the defended model beyond which REFINE broke the model rather than reprogrammed it. Working runs lost
#: 0.7-2.0 (white-box) and 1.4-2.5 points (black-box) at standard effort, 3.8-6.4 through a surrogate distilled once;
#: broken ones lost 36 (WaNet, distilled once) and 83 points (tiny effort, one class).
BA_DROP_LIMIT = 0.10
#: Defended vs submitted top-1 agreement on clean test images below which the defended model is another model.
DEFENDED_AGREEMENT_FLOOR = 0.75
#: Total-variation distance between the two models' prediction histograms: the share of predictions that moved to
#: other classes overall. A collapsed model (everything in one class) is near 0.9 on ten balanced classes.
HISTOGRAM_SHIFT_LIMIT = 0.20
#: A positive control proves something only if its backdoor works (every bench attack implanted 94.0-99.9%) and
#: REFINE removed it (ASR after 1.0-3.8% at standard effort in bench/results/refine_fmnist.json).
CONTROL_IMPLANT_FLOOR = 0.90
CONTROL_REMOVAL_CEILING = 0.10

# -- trigger reverse-engineering (auditor/detection/) ---------------------------------------------------------
#: A recovered trigger counts when its class's mask norm is this many robust standard deviations below the median
#: (the usual Neural Cleanse flag) and it sends at least this share of held-out clean images to that class.
TRIGGER_ANOMALY_THRESHOLD = ANOMALY_THRESHOLD
TRIGGER_MAX_NORM_RATIO = MAX_NORM_RATIO  # ... and at most half the median class's mask (anomaly.py says why)
TRIGGER_SUCCESS_FLOOR = 0.80
#: ... and only a small mask is a trigger: a search too short to converge (40 steps of 16 images) left a clean
#: Fashion-MNIST model's smallest mask at 19% of the image, flagged by index and ratio; recovered BadNets masks
#: covered 0.6-1.9% (README, "Trigger reverse-engineering").
TRIGGER_MAX_MASK_FRACTION = 0.10

# -- deployment bar ------------------------------------------------------------------------------------------------
#: The defended model replaces the submitted one only within 3 points of its BA (the issue's bar; standard effort
#: meets it with 0.7-2.5 points) and with 90% agreement (standard effort: 93.4-95.0%).
DEPLOY_BA_DROP = 0.03
DEPLOY_AGREEMENT = 0.90


def probe_images_floor(num_classes: int) -> int:
    return PROBE_IMAGES_PER_CLASS * num_classes


@dataclass(frozen=True)
class ControlFinding:
    attack: str
    asr_before: Interval
    asr_after: Interval


@dataclass(frozen=True)
class TriggerFinding:
    """The trigger search's answer as the verdict reads it."""

    suspected_class: int
    anomaly_index: float
    norm_ratio: float  # the suspected class's mask norm over the median class's
    mask_fraction: float  # the suspected mask's L1 norm as a share of the image area
    success: Interval  # the recovered trigger on held-out clean images not of suspected_class
    on_surrogate: bool  # API audits: the search ran on the distilled surrogate, not the submitted model
    calibrated: bool = True  # searched at least as long as the combined score's calibration (combined.py)
    probe_class: int | None = None  # the probe battery's suspected class (None: the probes suspect none)

    @property
    def anomaly_threshold(self) -> float:
        return TRIGGER_ANOMALY_THRESHOLD

    @property
    def recovered(self) -> bool:
        """An outlying small mask that works: what the module docstring calls a recovered trigger."""
        return (is_flagged(self.anomaly_index, self.norm_ratio) and self.mask_fraction <= TRIGGER_MAX_MASK_FRACTION
                and self.success.value >= TRIGGER_SUCCESS_FLOOR)

    @property
    def agrees_with_probes(self) -> bool:
        """Two independent readings name one class: what tells a backdoor from a clean model's universal patch."""
        return self.probe_class == self.suspected_class

    @property
    def counts(self) -> bool:
        """Whether it moves the verdict: recovered on the submitted model itself, toward the probes' suspect."""
        return self.recovered and not self.on_surrogate and self.agrees_with_probes


@dataclass(frozen=True)
class Findings:
    """The measured facts the gates and the verdict read (built by the evaluate stage)."""

    class_names: tuple[str, ...]
    agreement: Interval  # defended vs submitted, top-1, clean test images
    histogram_before: tuple[int, ...]  # predictions per class on clean test images, submitted model
    histogram_after: tuple[int, ...]  # ... defended model
    probe_images: int
    suspicion_before: Interval  # the score, its probe images and a bootstrap interval
    suspicion_after: Interval
    suspect_class: int | None
    ba_before: Interval | None = None  # None without test labels
    ba_after: Interval | None = None
    surrogate_agreement: Interval | None = None  # API audits
    controls: tuple[ControlFinding, ...] = ()
    trigger: TriggerFinding | None = None  # None: the trigger search did not run
    probe_battery: Battery = "full"  # which battery scored the model: its thresholds read the score

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ba_drop(self) -> float | None:
        if self.ba_before is None or self.ba_after is None:
            return None
        return self.ba_before.value - self.ba_after.value


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class Gate:
    """One check of the evidence: what was measured, against what, and whether it tripped."""

    name: str
    concerns: Literal["evidence", "defense"]
    threshold: float
    observed: float | None  # None: not measurable here (e.g. no test labels)
    tripped: bool
    reason: str | None = None  # one sentence, when tripped
    n: int | None = None  # images behind the observed value
    interval: tuple[float, float] | None = None  # its 95% interval, when it is a share


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class Fitness:
    fit_to_deploy: bool
    reason: str


@dataclass(frozen=True)
class Conclusion:
    verdict: dict[str, Any]
    gates: list[Gate] = field(default_factory=list)
    fitness: Fitness = Fitness(False, "")

    @property
    def tripped(self) -> list[Gate]:
        return [g for g in self.gates if g.tripped]


def conclude(findings: Findings) -> Conclusion:
    """Gates, then the verdict and the defended model's fitness (the module docstring's rules)."""
    gates = check_gates(findings)
    fitness = deployment_fitness(findings, gates)
    return Conclusion(verdict(findings, gates, fitness), gates, fitness)


def verdict_thresholds(battery: Battery) -> dict[str, float]:
    """The probe score's thresholds for the battery that produced it (the two batteries' scores differ in scale)."""
    return API_VERDICT_THRESHOLDS if battery == "api" else VERDICT_THRESHOLDS


def probe_level(score: float, battery: Battery = "full") -> Level:
    thresholds = verdict_thresholds(battery)
    if score >= thresholds["likely_backdoored"]:
        return "likely_backdoored"
    if score >= thresholds["suspicious"]:
        return "suspicious"
    return "no_evidence"


def combined_reading(findings: Findings) -> dict[str, Any] | None:
    """The combined score and its level, when the search ran on the submitted model as long as its calibration's."""
    t = findings.trigger
    if t is None or t.on_surrogate or not t.calibrated:
        return None
    return combined_verdict(findings.suspicion_before.value, t.anomaly_index, t.norm_ratio, t.success.value,
                            t.counts)


def verdict(findings: Findings, gates: list[Gate], fitness: Fitness) -> dict[str, Any]:
    """The level and a headline in plain words; the score is evidence, not proof (module docstring's rules)."""
    probe_reading = probe_level(findings.suspicion_before.value, findings.probe_battery)
    combined = combined_reading(findings)
    trigger = findings.trigger
    counts = trigger is not None and trigger.counts
    reading: Level = combined["level"] if combined else ("suspicious" if counts and probe_reading == "no_evidence"
                                                          else probe_reading)
    tripped = [g for g in gates if g.tripped]
    # Lifted: only the recovered trigger keeps the level off no_evidence (the score alone would not).
    lifted = reading != "no_evidence" and (combined["score_level"] if combined else probe_reading) == "no_evidence"
    suspect = trigger.suspected_class if (lifted or (combined and probe_reading == "no_evidence")) and trigger \
        else findings.suspect_class
    who = f" toward class {findings.class_names[suspect]}" if suspect is not None else ""
    scored = f" (combined score {combined['score']:.2f})" if combined else ""
    if tripped:
        level: Level = "inconclusive"
        alone = "The probes and the trigger search read" if combined else "The probes alone read"
        headline = f"Inconclusive: {tripped[0].reason} {alone} {reading.replace('_', ' ')}{who}."
    elif lifted:
        alone = f"The combined score alone reads no evidence{scored}" if combined else "The probes alone read no evidence"
        level, headline = "suspicious", f"{alone}, but"
    elif reading == "no_evidence":
        found = "Neither the probes nor the trigger search found backdoor evidence" if combined else \
            "No probe found trigger-like behaviour"
        level, headline = reading, f"{found}{scored}; unknown triggers cannot be ruled out."
    else:
        level, strength = reading, "Strong" if reading == "likely_backdoored" else "Some"
        headline = f"{strength} {'backdoor' if combined else 'trigger'} evidence{who}{scored}."
    if trigger is not None and trigger.recovered:
        headline += " " + _trigger_sentence(findings, trigger, lowercase=lifted and not tripped)
    headline += " " + _recommendation(level, fitness)
    return {
        "level": level, "headline": headline.strip()[:400], "reason": tripped[0].reason if tripped else None,
        "probe_level": probe_reading, "suspicion_before": findings.suspicion_before.value,
        "suspicion_after": findings.suspicion_after.value, "combined": combined,
        "trigger_evidence": None if trigger is None else trigger.counts,
    }


def _trigger_sentence(findings: Findings, trigger: TriggerFinding, lowercase: bool) -> str:
    where = "on the surrogate " if trigger.on_surrogate else ""
    sentence = (f"Trigger reverse-engineering {where}recovered a small trigger toward class "
                f"{findings.class_names[trigger.suspected_class]}: it sends {_pct(trigger.success.value)} of "
                f"{trigger.success.n:,} held-out images there (anomaly index {trigger.anomaly_index:.1f}).")
    if trigger.on_surrogate:
        sentence += " Not verified against the API."
    elif not trigger.agrees_with_probes:
        probes = "suspect no class" if trigger.probe_class is None else \
            f"point at class {findings.class_names[trigger.probe_class]}"
        sentence += f" Not counted: the probes {probes}, and small clean models carry such universal patches."
    return sentence[:1].lower() + sentence[1:] if lowercase else sentence


def _recommendation(level: Level, fitness: Fitness) -> str:
    if not fitness.fit_to_deploy:
        return "Do not deploy the defended model."
    if level in ("likely_backdoored", "suspicious"):
        return "Use the defended model."
    return "The defended model is fit to deploy." if level == "inconclusive" else ""


# -- the gates -----------------------------------------------------------------------------------------------------


def check_gates(f: Findings) -> list[Gate]:
    """Every gate that applies to this audit, evidence gates first (the first tripped one is the verdict's reason)."""
    gates = [_probe_gate(f), _evaluation_gate(f)]
    if f.surrogate_agreement is not None:
        gates.append(_floor_gate("surrogate_agreement", "evidence", f.surrogate_agreement, SURROGATE_AGREEMENT_FLOOR,
                                 "the surrogate agrees with the API on only {v} of clean test images"))
    if f.ba_drop is not None:
        gates.append(_ba_drop_gate(f))
    gates.append(_floor_gate("defended_agreement", "defense", f.agreement, DEFENDED_AGREEMENT_FLOOR,
                             "the defended model agrees with the submitted one on only {v} of clean test images"))
    gates.append(_histogram_gate(f))
    if f.controls:
        gates += _control_gates(f.controls)
    return gates


def _probe_gate(f: Findings) -> Gate:
    floor = probe_images_floor(f.num_classes)
    tripped = f.probe_images < floor
    reason = (f"the probes ran on {f.probe_images} images, fewer than the {floor} ({PROBE_IMAGES_PER_CLASS} per "
              "class) that probe evidence needs.") if tripped else None
    return Gate("probe_images", "evidence", float(floor), float(f.probe_images), tripped, reason, f.probe_images)


def _evaluation_gate(f: Findings) -> Gate:
    """The widest 95% interval among the shares the verdict and the defense rest on."""
    measured = [i for i in (f.ba_before, f.ba_after) if i is not None] or [f.agreement]
    widest = max(measured, key=lambda i: i.half_width)
    tripped = widest.half_width > EVALUATION_HALF_WIDTH + 1e-9
    reason = (f"BA was measured on {widest.n:,} test images, ±{_pts(widest.half_width)} points at 95% confidence, "
              f"wider than ±{_pts(EVALUATION_HALF_WIDTH)}.") if tripped else None
    return Gate("evaluation_size", "evidence", EVALUATION_HALF_WIDTH, widest.half_width, tripped, reason, widest.n,
                (widest.low, widest.high))


def _floor_gate(name: str, concerns: Literal["evidence", "defense"], measured: Interval, floor: float,
                sentence: str) -> Gate:
    tripped = measured.value < floor
    reason = f"{sentence.format(v=_pct(measured.value))} (floor {_pct(floor)})." if tripped else None
    return Gate(name, concerns, floor, measured.value, tripped, reason, measured.n, (measured.low, measured.high))


def _ba_drop_gate(f: Findings) -> Gate:
    drop = f.ba_drop
    assert drop is not None and f.ba_before is not None and f.ba_after is not None
    tripped = drop > BA_DROP_LIMIT
    reason = (f"the defended model loses {_pts(drop)} points of BA ({_pct(f.ba_before.value)} to "
              f"{_pct(f.ba_after.value)}), more than the {_pts(BA_DROP_LIMIT)} a working REFINE costs.") if tripped else None
    return Gate("ba_drop", "defense", BA_DROP_LIMIT, drop, tripped, reason, f.ba_after.n)


def _histogram_gate(f: Findings) -> Gate:
    shift = histogram_shift(f.histogram_before, f.histogram_after)
    share, top = _top_share(f.histogram_after)
    tripped = shift > HISTOGRAM_SHIFT_LIMIT
    reason = (f"the defended model's predictions moved {_pct(shift)} toward other classes ({_pct(share)} now go to "
              f"{f.class_names[top]}): it is collapsing.") if tripped else None
    return Gate("prediction_histogram", "defense", HISTOGRAM_SHIFT_LIMIT, shift, tripped, reason,
                sum(f.histogram_after))


def _control_gates(controls: tuple[ControlFinding, ...]) -> list[Gate]:
    weakest = min(controls, key=lambda c: c.asr_before.value)
    strongest = max(controls, key=lambda c: c.asr_after.value)
    implant_tripped = weakest.asr_before.value < CONTROL_IMPLANT_FLOOR
    removal_tripped = strongest.asr_after.value > CONTROL_REMOVAL_CEILING
    implant_reason = (f"the {weakest.attack} positive control implanted only {_pct(weakest.asr_before.value)} ASR "
                      f"(floor {_pct(CONTROL_IMPLANT_FLOOR)}), so it cannot show that REFINE removes backdoors here.")
    removal_reason = (f"REFINE left the {strongest.attack} positive control at {_pct(strongest.asr_after.value)} ASR "
                      f"(ceiling {_pct(CONTROL_REMOVAL_CEILING)}).")
    return [
        Gate("controls_implanted", "defense", CONTROL_IMPLANT_FLOOR, weakest.asr_before.value, implant_tripped,
             implant_reason if implant_tripped else None, weakest.asr_before.n,
             (weakest.asr_before.low, weakest.asr_before.high)),
        Gate("controls_removed", "defense", CONTROL_REMOVAL_CEILING, strongest.asr_after.value, removal_tripped,
             removal_reason if removal_tripped else None, strongest.asr_after.n,
             (strongest.asr_after.low, strongest.asr_after.high)),
    ]


def histogram_shift(before: tuple[int, ...], after: tuple[int, ...]) -> float:
    """Total-variation distance between two prediction histograms (0: same shares, 1: disjoint)."""
    n_before, n_after = sum(before) or 1, sum(after) or 1
    return 0.5 * sum(abs(b / n_before - a / n_after) for b, a in zip(before, after))


def _top_share(histogram: tuple[int, ...]) -> tuple[float, int]:
    total = sum(histogram) or 1
    top = max(range(len(histogram)), key=lambda k: histogram[k])
    return histogram[top] / total, top


# -- the defended model --------------------------------------------------------------------------------------------


def deployment_fitness(f: Findings, gates: list[Gate]) -> Fitness:
    """Fit to deploy: no defense gate tripped, and within the deployment bar on BA and agreement."""
    broken = [g for g in gates if g.tripped and g.concerns == "defense"]
    if broken:
        return Fitness(False, _capitalised(broken[0].reason or ""))
    drop = f.ba_drop
    if drop is not None and drop > DEPLOY_BA_DROP:
        return Fitness(False, f"It loses {_pts(drop)} points of BA, more than the {_pts(DEPLOY_BA_DROP)} a "
                              "replacement may cost.")
    if f.agreement.value < DEPLOY_AGREEMENT:
        return Fitness(False, f"It agrees with the submitted model on {_pct(f.agreement.value)} of clean test "
                              f"images, below the {_pct(DEPLOY_AGREEMENT)} a replacement needs.")
    cost = f"loses {_pts(drop)} points of BA and " if drop is not None else ""
    return Fitness(True, f"It {cost}agrees with the submitted model on {_pct(f.agreement.value)} of "
                         f"{f.agreement.n:,} clean test images" + (
                             "; REFINE removed every positive control's backdoor." if f.controls else "."))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _pts(value: float) -> str:
    return f"{100 * value:.1f}"


def _capitalised(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]
