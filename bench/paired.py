"""Paired comparison of two pass/fail outcomes on the same samples (a variant against dense).

Each sample is run with both settings, so the comparison counts discordant pairs:
lost = dense right and the variant wrong, gained = dense wrong and the variant right. The
difference in success rate is (gained - lost) / n. Its 95% interval is Newcombe's hybrid score
interval for paired proportions (Newcombe 1998, "Improved confidence intervals for the difference
between binomial proportions based on paired data", method 10): Wilson score intervals of the
two marginal rates combined with the phi correlation of the pairs. It stays inside [-1, 1] and
behaves with zero discordant pairs, where the Wald interval collapses to a point. The exact
McNemar p-value (two-sided binomial test on the discordant pairs) goes beside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: binomial(lost + gained, 1/2) tail at min(lost, gained)."""
    discordant = lost + gained
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, i) for i in range(min(lost, gained) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """Variant against reference (dense) on the same n samples; rates and difference in [0, 1]."""

    n: int
    reference_successes: int
    variant_successes: int
    lost: int
    gained: int
    difference: float  # variant rate - reference rate
    difference_low: float  # 95% interval, Newcombe hybrid score (method 10)
    difference_high: float
    mcnemar_p: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_paired(reference: list[bool], variant: list[bool]) -> PairedComparison:
    """Counts, difference and its 95% interval for outcomes paired by position."""
    if len(reference) != len(variant):
        raise ValueError(f"paired outcomes differ in length: {len(reference)} vs {len(variant)}")
    n = len(reference)
    both = sum(r and v for r, v in zip(reference, variant))
    lost = sum(r and not v for r, v in zip(reference, variant))
    gained = sum(v and not r for r, v in zip(reference, variant))
    neither = n - both - lost - gained
    low, high = newcombe_paired_interval(both, gained, lost, neither)
    return PairedComparison(
        n=n,
        reference_successes=both + lost,
        variant_successes=both + gained,
        lost=lost,
        gained=gained,
        difference=(gained - lost) / n if n else 0.0,
        difference_low=low,
        difference_high=high,
        mcnemar_p=mcnemar_exact_p(lost, gained),
    )


def newcombe_paired_interval(both: int, only_variant: int, only_reference: int, neither: int):
    """95% interval for p_variant - p_reference from the paired 2x2 table (method 10).

    With the variant's rate p2 = (both + only_variant) / n, the reference's p1, their Wilson
    intervals (l2, u2), (l1, u1) and phi the continuity-corrected correlation of the table:
        low  = d - sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)
        high = d + sqrt((u2 - p2)^2 - 2 phi (u2 - p2)(p1 - l1) + (p1 - l1)^2)
    """
    n = both + only_variant + only_reference + neither
    if n == 0:
        return -1.0, 1.0
    p2, p1 = (both + only_variant) / n, (both + only_reference) / n
    l2, u2 = wilson_interval(both + only_variant, n)
    l1, u1 = wilson_interval(both + only_reference, n)
    # phi of the table rows = variant (pass, fail), columns = reference (pass, fail)
    a, b, c, d = both, only_variant, only_reference, neither
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        cross = a * d - b * c
        cross = max(cross - n / 2, 0.0) if cross > 0 else cross
        phi = cross / math.sqrt(margins)
    diff = p2 - p1
    low = diff - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    high = diff + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return max(-1.0, low), min(1.0, high)
