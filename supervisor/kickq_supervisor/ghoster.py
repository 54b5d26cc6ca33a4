"""Ghosting lost runs for the master, in a thread, so the master loop never waits on Redis."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import redis

from kickq import acks, scripts
from kickq.backoff import Outage
from kickq.connection import connect
from kickq.errors import ReplicationTimeout
from kickq.keys import Keys
from kickq.logformat import job_extra

log = logging.getLogger("kickq.master")

#: Makes one script call: (script name, (keys, args), the jobs it is about) -> its reply.
Save = Callable[[str, tuple[list[str], list[Any]], list[str]], Any]


class Ghoster:
    """`submit(namespace, job_id, token, error)` ghosts the run with that token (a no-op if the job
    moved on); `submit_claimed(...)` settles what a worker held when it went. Work that cannot be
    done because Redis is down is retried; if the supervisor exits first, the reaper recovers the
    runs when their lease expires.

    With wait_replicas > 0, each save is followed by a WAIT on its connection (kickq.acks). A
    shortfall is logged and left as it is: the save is on the master, and should a failover lose
    it, the run is still `processing` there and the reaper recovers it when its lease expires."""

    def __init__(self, settings: Mapping[str, Any], connector: Callable[..., Any] = connect) -> None:
        self.settings = dict(settings)
        self.connector = connector
        self.acks = acks.wanted(self.settings)
        # each item: a function to run with a Save, and what it is about (for the log)
        self.pending: queue.Queue[tuple[Callable[[Save], None], str] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="kickq-ghoster", daemon=True)
        self.thread.start()

    def submit(self, namespace: str, job_id: str, token: str, error: str, claimer: str = "",
               started: float | None = None, name: str = "") -> None:
        """`started`: the run's start on time.monotonic() (the worker's S message), which Redis
        does not have for a job claimed ahead; the run then ended when this was submitted.
        `name`: the job's name, for the log."""
        run_ms = None if started is None else max(0, int(round((time.monotonic() - started) * 1000)))

        def ghost(save: Save) -> None:
            call = scripts.finish_args(Keys(namespace), job_id, token, "ghost", error, claimer=claimer,
                                       run_ms=run_ms)
            status, state, _ = scripts.parse_finish(save("finish", call, [job_id]))
            log.info("job %s (token %s): %s -> %s", job_id, token, error,
                     state if status == "ok" else f"unchanged ({status})", extra=job_extra(job_id, name))
        self.pending.put((ghost, f"job {job_id}"))

    def submit_claimed(self, namespace: str, claimer: str, error: str,
                       unsaved: Sequence[tuple[str, str, str, str, int, float]] = ()) -> None:
        """Settle what worker `claimer` held when it went (abandon.lua): save the outcomes it
        reported but may not have saved ((id, token, outcome, payload, run ms, reported at on
        time.monotonic())), give back the jobs it claimed and never started, ghost a job it claimed
        to start at once and never reported. Token-checked: what moved on is left alone."""
        unsaved = list(unsaved)

        def abandon(save: Save) -> None:
            now = time.monotonic()
            runs = [(i, t, outcome, payload, run_ms, int((now - at) * 1000))
                    for i, t, outcome, payload, run_ms, at in unsaved]
            call = scripts.abandon_args(Keys(namespace), claimer, error, runs, mono_ms=now * 1000)
            saved, given_back, ghosted = map(int, save("abandon", call, [run[0] for run in runs]))
            if saved or given_back or ghosted:
                log.info("a worker went: %d outcomes saved for it, %d jobs given back, %d ghosted",
                         saved, given_back, ghosted)
        self.pending.put((abandon, f"what worker {claimer} held"))

    def flush(self, timeout: float) -> None:
        """Wait (at most `timeout`) until every submitted item has been done."""
        deadline = time.monotonic() + timeout
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        client = self.connector(self.settings)
        scr = scripts.Scripts(client)
        outage = Outage(log, "ghoster")
        wanted = self.acks

        def save(name: str, keys_and_args: tuple[list[str], list[Any]], job_ids: list[str]) -> Any:
            if wanted is None:
                return scr.run(name, keys_and_args)
            (reply,), waited = acks.run(client, scr, [(name, keys_and_args)], wanted)
            acks.confirm(wanted, waited, f"the master's {name}", job_ids, acks.where(client.connection_pool))
            return reply

        while True:
            item = self.pending.get()
            if item is None:
                return
            work, about = item
            while True:
                try:
                    work(save)
                    outage.ok()
                    break
                except ReplicationTimeout as exc:
                    outage.ok()  # Redis answered
                    log.warning("settling %s: saved on the master, but %d of %d replicas confirmed it "
                                "within %gs; should a failover lose it, lease recovery (the reaper) "
                                "settles the runs", about, exc.confirmed, exc.wanted, exc.timeout)
                    break
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    log.debug("cannot settle %s yet (%s)", about, exc)
                    time.sleep(outage.failed(exc))
                except Exception:  # noqa: BLE001 - this thread must outlive any one item
                    # Not a passing outage: trying again would fail again. The runs are left to
                    # lease recovery (the reaper), as if this supervisor had gone.
                    log.exception("cannot settle %s; its runs are left to lease recovery", about)
                    break
            self.pending.task_done()
