"""kickq.backoff.Backoff: the delays of every retry loop, with an injected random source."""
from __future__ import annotations

import pytest

from kickq.backoff import FIRST_DELAY, MAX_DELAY, Backoff


def delays(backoff: Backoff, n: int) -> list[float]:
    return [round(backoff.next_delay(), 6) for _ in range(n)]


def test_the_delays_double_from_the_first_up_to_the_cap():
    assert delays(Backoff(), 9) == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert (FIRST_DELAY, MAX_DELAY) == (0.05, 2.0)
    assert delays(Backoff(first=0.1, cap=0.3), 4) == [0.1, 0.2, 0.3, 0.3]


def test_reset_starts_again_from_the_first_delay():
    backoff = Backoff()
    delays(backoff, 5)
    backoff.reset()
    assert delays(backoff, 2) == [0.05, 0.1]


def test_jitter_scales_each_delay_within_its_band():
    draws = iter([0.0, 0.5, 0.999999, 0.25])
    backoff = Backoff(jitter=0.5, rand=lambda: next(draws))
    # factors 1 - j + 2j*draw: 0.5, 1.0, ~1.5, 0.75, applied to 0.05, 0.1, 0.2, 0.4
    assert delays(backoff, 4) == [0.025, 0.1, round(0.2 * 1.499999, 6), 0.3]


def test_jitter_does_not_change_the_progression():
    backoff = Backoff(jitter=1.0, rand=lambda: 0.0)  # a zero delay must not stall the doubling
    assert delays(backoff, 3) == [0.0, 0.0, 0.0]
    backoff = Backoff(jitter=1.0, rand=lambda: 0.5)
    assert delays(backoff, 3) == [0.05, 0.1, 0.2]


@pytest.mark.parametrize("kwargs", [{"first": 0}, {"first": 3.0, "cap": 2.0}, {"jitter": -0.1},
                                    {"jitter": 1.5}])
def test_nonsense_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)
