"""95% intervals for the shares an audit reports, and the sample sizes that make them narrow enough.

Every proportion in a report (BA, ASR, agreement) is measured on a finite
sample, so it is reported with its sample size and a Wilson score interval:
unlike the textbook ``p ± z·sqrt(p(1-p)/n)``, Wilson's interval stays inside
[0, 1] and keeps a sensible width when p is 0 or 1, which is exactly where ASR
after a working defense lives.

Sizing rule (used by the audit plan to size evaluation sets): to estimate a
proportion p within ±h at 95% confidence, n = ⌈z² · p(1 − p) / h²⌉ images.
Before an audit runs p is unknown, so BA is planned at the worst case p = 0.5:
±2 points needs 2,401 images. ASR of a working defense is near 0, where far
fewer suffice (p = 0.05: 457 images; p = 0.02: 189), so an evaluation set sized
for BA also covers ASR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95% normal quantile
WORST_CASE_P = 0.5  # where p(1 - p) is largest: the size that suits any proportion


@dataclass(frozen=True)
class Interval:
    """A share with its sample size and 95% interval, all in [0, 1]."""

    value: float
    n: int
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "n": self.n, "low": self.low, "high": self.high}


def wilson(successes: int | float, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of ``successes / n``; n = 0 gives the uninformative [0, 1]."""
    if n <= 0:
        return Interval(0.0, 0, 0.0, 1.0)
    p = min(1.0, max(0.0, successes / n))
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At p = 0 or 1 the bounds equal p exactly in theory; in floating point they can miss it by an ulp
    # (1 - 2e-16), and an interval that does not hold its own value fails the report's validation.
    return Interval(p, n, min(p, max(0.0, centre - spread)), max(p, min(1.0, centre + spread)))


def share_interval(value: float, n: int) -> Interval:
    """Wilson interval of a share measured as a fraction of ``n`` images."""
    return wilson(round(value * n), n)


def images_for_half_width(half_width: float, p: float = WORST_CASE_P, z: float = Z95) -> int:
    """Images needed to measure a proportion near ``p`` within ±``half_width`` (normal approximation)."""
    if not 0 < half_width < 1:
        raise ValueError("half_width must be in (0, 1)")
    return math.ceil(z * z * p * (1 - p) / (half_width * half_width))
