"""How long to wait before trying Redis again: one helper for every retry loop of kickq and its
supervisor. It only computes delays; a thread sleeps them with time.sleep (or an Event's wait),
a coroutine with asyncio.sleep."""
from __future__ import annotations

import logging
import random
import time
from typing import Callable

#: The first delay after a failure, and the longest: short enough that a passing blip costs
#: little, long enough that a Redis that is down is not hammered.
FIRST_DELAY = 0.05
MAX_DELAY = 2.0


class Backoff:
    """Delays for consecutive failures: `first`, then twice the previous, up to `cap`. With
    `jitter` j each delay is multiplied by a random factor in [1 - j, 1 + j], so that processes
    that lost Redis together do not all retry at the same moment. `reset()` after a success.

        backoff = Backoff()
        while True:
            try:
                work()
                backoff.reset()
            except redis.exceptions.ConnectionError:
                time.sleep(backoff.next_delay())
    """

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY, jitter: float = 0.0,
                 rand: Callable[[], float] = random.random) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"need 0 < first <= cap, got first={first!r}, cap={cap!r}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter!r}")
        self.first, self.cap, self.jitter = first, cap, jitter
        self._rand = rand  # uniform in [0, 1), injected by the tests
        self._delay = first

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; the call after this one gives twice as long
        (before jitter), at most `cap`."""
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        if self.jitter:
            delay *= 1 - self.jitter + 2 * self.jitter * self._rand()
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits `first` again."""
        self._delay = self.first


class Outage:
    """A retry loop's backoff, and its log: a lost Redis is logged once per outage (the first
    failure, at WARNING; the retries after it at DEBUG), and its end once (at INFO, with how long it
    lasted and how many retries it took). A 20 s failover then costs each process two lines, not
    one per retry.

        outage = Outage(log, "reaper")
        while True:
            try:
                work()
                outage.ok()
            except redis.exceptions.ConnectionError as exc:
                time.sleep(outage.failed(exc))
    """

    def __init__(self, logger: logging.Logger, what: str, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.what = what
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.since: float | None = None  # when the current outage began (None: not in one)
        self.retries = 0

    def failed(self, error: BaseException) -> float:
        """A failure: logged if it begins an outage. Returns the delay before the next attempt."""
        delay = self.backoff.next_delay()
        if self.since is None:
            self.since, self.retries = self.clock(), 0
            self.log.warning("%s: Redis unavailable (%s); retrying, with a backoff of up to %gs, until it "
                             "is back", self.what, error, self.backoff.cap)
        else:
            self.retries += 1
            self.log.debug("%s: Redis still unavailable (%s); retrying in %.2fs", self.what, error, delay)
        return delay

    def ok(self) -> None:
        """A success: ends the outage, if there was one."""
        self.backoff.reset()
        if self.since is not None:
            self.log.info("%s: Redis is back after %.1fs (%d retries)", self.what,
                          self.clock() - self.since, self.retries)
            self.since = None
