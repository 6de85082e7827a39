"""The pair-order rules of bench/stats.py: balanced, seeded, and an order effect that shows."""

from __future__ import annotations

import math
import random

import pytest
from bench.stats import BASELINE_FIRST, OURS_FIRST, balanced_orders, from_pairs, run_pairs, single


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_orders_are_balanced_and_seeded(n: int) -> None:
    orders = balanced_orders(n, random.Random(7))
    assert len(orders) == n
    assert abs(orders.count(OURS_FIRST) - orders.count(BASELINE_FIRST)) == n % 2
    assert orders == balanced_orders(n, random.Random(7))


def test_the_odd_pair_is_drawn() -> None:
    assert {balanced_orders(1, random.Random(seed))[0] for seed in range(20)} == {
        OURS_FIRST, BASELINE_FIRST
    }  # fmt: skip


def test_orders_are_shuffled() -> None:
    seen = {tuple(balanced_orders(6, random.Random(seed))) for seed in range(20)}
    assert len(seen) > 1


def test_an_order_effect_is_reported() -> None:
    # Whoever runs second is 20 % slower: ratio 1/1.2 ours-first, 1.2 baseline-first.
    orders = [OURS_FIRST, BASELINE_FIRST, OURS_FIRST, BASELINE_FIRST]
    ours = [10.0, 12.0, 10.0, 12.0]
    base = [12.0, 10.0, 12.0, 10.0]
    figure = from_pairs("x", "x", "ms", ours, base, orders, "b")
    assert figure.order_effect == pytest.approx((10 / 12) / (12 / 10), abs=1e-3)
    assert figure.ratio == pytest.approx(1.0, abs=0.1)
    assert figure.n == 4


async def test_run_pairs_calls_in_the_drawn_order() -> None:
    calls: list[str] = []

    async def ours() -> str:
        calls.append("ours")
        return "o"

    async def base() -> str:
        calls.append("base")
        return "b"

    got, got_base, orders = await run_pairs(4, random.Random(3), ours, base)
    assert got == ["o"] * 4
    assert got_base == ["b"] * 4
    expected = []
    for order in orders:
        expected += ["ours", "base"] if order == OURS_FIRST else ["base", "ours"]
    assert calls == expected


def test_single_ratio_and_zero_baseline() -> None:
    assert single("x", "x", "MiB", 3, 2, "b").ratio == 1.5
    assert math.isnan(single("x", "x", "MiB", 3, 0, "b").ratio)
