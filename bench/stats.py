"""Paired measurements in a randomised, balanced order, and the figure record they produce.

Why: the first VM of a back-to-back pair runs measurably differently from the second (page
cache, CPU frequency, the other helpers' load drifting), about 20 % in earlier runs. So every
pair runs "ours" and its baseline back to back in an order drawn from a balanced shuffle
(half the pairs ours first, half baseline first, permuted by a seeded RNG), and the figure
reports the order effect: the median ratio of the ours-first pairs over that of the
baseline-first pairs (1.0: no effect; the median over all pairs cancels it out).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

T = TypeVar("T")

OURS_FIRST = "ours-first"
BASELINE_FIRST = "baseline-first"


def balanced_orders(n: int, rng: random.Random) -> list[str]:
    """``n`` pair orders: as many ours-first as baseline-first (for an odd ``n`` the odd one
    drawn at random), shuffled."""
    orders = [OURS_FIRST, BASELINE_FIRST] * (n // 2)
    if n % 2:
        orders.append(rng.choice((OURS_FIRST, BASELINE_FIRST)))
    rng.shuffle(orders)
    return orders


@dataclass
class Figure:
    """One figure of the report: ours against its baseline, measured in the same run."""

    id: str
    title: str
    unit: str
    ours: float
    baseline: float
    baseline_label: str
    ratio: float
    n: int
    lower_is_better: bool = True
    ours_samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    order_effect: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        effect = f"  order effect {self.order_effect:.3f}" if self.order_effect else ""
        return (
            f"{self.title}: ours {fmt(self.ours)} {self.unit}  baseline {fmt(self.baseline)} "
            f"{self.unit} ({self.baseline_label})  ratio {self.ratio:.3f}  n={self.n}{effect}"
        )


def fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def single(
    id: str,
    title: str,
    unit: str,
    ours: float,
    baseline: float,
    baseline_label: str,
    *,
    n: int = 1,
    lower_is_better: bool = True,
    note: str = "",
) -> Figure:
    """A figure of two values (no pairs): the ratio is ours / baseline."""
    return Figure(
        id=id,
        title=title,
        unit=unit,
        ours=round(ours, 3),
        baseline=round(baseline, 3),
        baseline_label=baseline_label,
        ratio=round(ours / baseline, 3) if baseline else float("nan"),
        n=n,
        lower_is_better=lower_is_better,
        note=note,
    )


def from_pairs(
    id: str,
    title: str,
    unit: str,
    ours: list[float],
    baseline: list[float],
    orders: list[str],
    baseline_label: str,
    *,
    note: str = "",
) -> Figure:
    """A figure from paired samples: medians, the median of the per-pair ratios, the order
    effect (see the module docstring)."""
    ratios = [o / b for o, b in zip(ours, baseline, strict=True)]
    first = [r for r, o in zip(ratios, orders, strict=True) if o == OURS_FIRST]
    second = [r for r, o in zip(ratios, orders, strict=True) if o == BASELINE_FIRST]
    effect = (
        round(statistics.median(first) / statistics.median(second), 3) if first and second else None
    )
    return Figure(
        id=id,
        title=title,
        unit=unit,
        ours=round(statistics.median(ours), 3),
        baseline=round(statistics.median(baseline), 3),
        baseline_label=baseline_label,
        ratio=round(statistics.median(ratios), 3),
        n=len(ratios),
        ours_samples=[round(v, 3) for v in ours],
        baseline_samples=[round(v, 3) for v in baseline],
        orders=orders,
        order_effect=effect,
        note=note,
    )


async def run_pairs(
    n: int,
    rng: random.Random,
    ours: Callable[[], Awaitable[T]],
    baseline: Callable[[], Awaitable[T]],
) -> tuple[list[T], list[T], list[str]]:
    """Run ``n`` pairs of the two measurements in a balanced random order; each call returns
    its own sample (it does its own timing and cleanup)."""
    orders = balanced_orders(n, rng)
    got_ours: list[T] = []
    got_base: list[T] = []
    for order in orders:
        if order == OURS_FIRST:
            got_ours.append(await ours())
            got_base.append(await baseline())
        else:
            got_base.append(await baseline())
            got_ours.append(await ours())
    return got_ours, got_base, orders
