"""kickq.backoff: Backoff, the delays of every retry loop (with an injected random source), and
Outage, which logs a lost Redis once per outage (with an injected clock)."""
from __future__ import annotations

import logging

import pytest

from kickq.backoff import FIRST_DELAY, MAX_DELAY, Backoff, Outage


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


# --- Outage: a lost Redis logged once per outage -------------------------------------------------------

def test_an_outage_is_logged_once_when_it_begins_and_once_when_it_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    outage = Outage(logging.getLogger("kickq.test"), "worker 3", Backoff(first=0.05, cap=2.0),
                    clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="kickq.test"):
        delays = []
        for _ in range(20):  # 20 failed retries
            delays.append(outage.failed(ConnectionError("refused")))
            now[0] += delays[-1]
        outage.ok()
        outage.ok()  # no outage to end
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "worker 3: Redis unavailable (refused)" in warnings[0].getMessage()
    assert len(infos) == 1
    assert infos[0].getMessage() == f"worker 3: Redis is back after {sum(delays):.1f}s (19 retries)"
    assert delays[:3] == [0.05, 0.1, 0.2] and max(delays) == 2.0  # the backoff's bound
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 19


def test_each_outage_is_logged_on_its_own(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(logging.getLogger("kickq.test"), "reaper", clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="kickq.test"):
        for _ in range(3):
            outage.failed(ConnectionError("a"))
            outage.failed(ConnectionError("b"))
            outage.ok()
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"] * 3
    assert outage.backoff.next_delay() == outage.backoff.first  # ok() reset the backoff
