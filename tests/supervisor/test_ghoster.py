"""The master's ghoster thread: one item it cannot do does not stop the ones after it."""
from __future__ import annotations

import logging

from kickq_supervisor.ghoster import Ghoster
from tests.helpers import wait_until


def test_an_item_that_fails_is_logged_and_the_next_ones_still_run(kq, caplog):
    ghoster = Ghoster(kq.settings())
    done = []

    def broken(scr):
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    with caplog.at_level(logging.ERROR, logger="kickq.master"):
        ghoster.pending.put((broken, "job 1"))
        ghoster.pending.put((lambda scr: done.append("job 2"), "job 2"))
        wait_until(lambda: done, timeout=10, message="the item after the broken one ran")
    assert ghoster.thread.is_alive()
    assert "cannot settle job 1; its runs are left to lease recovery" in caplog.text
    ghoster.pending.put(None)
    ghoster.thread.join(timeout=10)
