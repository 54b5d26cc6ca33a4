"""`python -m tests.faults.reaper_proc URL NAMESPACE INTERVAL`: one kickq reaper on its own, the same
code a supervisor runs in its reaper process (case 7 starts several at once)."""

from __future__ import annotations

import logging
import sys

from kickq.config import current, merge_settings
from kickq_supervisor.reaper import Reaper


def main() -> int:
    url, namespace, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    logging.basicConfig(
        level=logging.DEBUG,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    logging.getLogger("redis").setLevel(logging.WARNING)
    settings = merge_settings(current(), {"redis_url": url, "redis_namespace": namespace})
    return Reaper(settings, [namespace], interval=interval).run()


if __name__ == "__main__":
    raise SystemExit(main())
