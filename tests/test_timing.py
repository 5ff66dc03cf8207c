"""The benchmark timers (CPU: wall clock)."""

from __future__ import annotations

import torch

from flexprefill_torch.timing import host_ms, paired_median_ms


def test_paired_median_ms_rotates_the_order() -> None:
    """After one warm-up call each, every round starts one function later: no function
    always runs first or right after the same other."""
    order: list[str] = []
    fns = [lambda name=name: order.append(name) for name in "abc"]
    times = paired_median_ms(fns, torch.device("cpu"), repeats=4, calls=2)
    assert order[:3] == list("abc")
    rounds = ["".join(order[3 + 6 * r : 9 + 6 * r : 2]) for r in range(4)]
    assert rounds == ["abc", "bca", "cab", "abc"]
    assert order[3:] == [name for r in rounds for name in r for _ in range(2)]
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_host_ms_times_the_calls() -> None:
    """One warm-up call, then ``repeats`` samples of ``calls`` calls each."""
    count: list[int] = []
    ms = host_ms(lambda: count.append(1), torch.device("cpu"), calls=3, repeats=4)
    assert len(count) == 1 + 3 * 4
    assert ms >= 0
