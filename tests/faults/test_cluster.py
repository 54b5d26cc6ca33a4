"""Faults of a Redis Cluster under load (case 13): a namespace's slot migrated live to another master
(13a), and the namespace's master SIGKILLed so that its replica is promoted (13b). Real supervisors
and producers on a private cluster of 3 masters with a replica each (tests/topology.py)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

import kickq
from kickq.keys import Keys
from tests.faults.harness import (
    Case,
    Producer,
    Monitor,
    handler_module,
    namespace_client,
    outcomes,
    purge_and_find_strays,
    sizes,
    supervisor_pids,
    wait_settled,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.cluster

RATE = 300  # creates per second
OPTS = {"process_timeout": 5, "ghost_interval": 0}


def end_case(case: Case, pids: set[int], alive_now: set[int], monitor: Monitor, strays: list[str]) -> None:
    """The checks both cases end with, then the report."""
    case.check(
        "no supervisor process exited or was replaced", alive_now == pids, f"{len(pids - alive_now)} gone"
    )
    case.check("invariants hold in every snapshot (a job in exactly one structure)", not monitor.found,
               monitor.found[:5])
    case.check("no stray keys after purge", not strays, strays)
    case.done()


def first_completion_after(r, ns: str, producer: Producer, moment: float, timeout: float) -> float:
    """Seconds from `moment` until the first job created after it has succeeded."""
    keys = Keys(ns)

    def done() -> bool:
        refs = producer.sent_after(moment)
        return bool(refs) and r.hget(keys.job(producer.acked[refs[0]]), "state") == "success"

    wait_until(done, timeout=timeout, interval=0.01, message="a job created after the fault completes")
    return time.monotonic() - moment


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case13a_a_namespace_slot_migrated_live_under_load(
    size, make_cluster, ledger, start_supervisor, tmp_path
):
    quick = size == "quick"
    load, pause, moves = (1.5, 0.01, 1) if quick else (5.0, 0.02, 2)
    case = Case(
        "13a",
        "a namespace's slot migrated live to another master under load (as redis-cli --cluster reshard)",
        f"{RATE} creates/s, {load:g}s before each of {moves} move(s) (10 keys per MIGRATE, "
        f"{pause * 1000:g} ms between batches) and {load:g}s after; 2 workers",
    )
    cluster = make_cluster()
    masters = cluster.masters()
    ns = cluster.namespace_on(masters[0], "kf")
    slot = cluster.slot_of(ns)
    r = namespace_client(cluster.url, ns)
    module = handler_module(tmp_path, ledger.path, [(["work"], 2)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=cluster.url, ns=ns)
    pids = supervisor_pids(sup)
    kq = kickq.Kickq(redis_url=cluster.url, redis_namespace=ns, redis_timeout=10)
    producer = Producer(kq, "work", RATE, data={"ms": 2}, opts=OPTS)
    windows, resumed, in_flight, keys_moved = [], [], [], []
    with Monitor(cluster.url, ns, interval=0.3) as monitor:
        producer.start()
        for target in masters[1:1 + moves]:
            time.sleep(load)  # the load runs: the case's pace, nothing is awaited
            in_flight.append(r.zcard(Keys(ns).processing))
            source = cluster.owner_of(ns)
            began = time.monotonic()
            move = cluster.move_slot(slot, target, batch=10, pause=pause)
            ended = time.monotonic()
            windows.append(ended - began)
            keys_moved.append((cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot),
                               move.count_on(target)))
            resumed.append(first_completion_after(r, ns, producer, ended, timeout=30))
        time.sleep(load)
        producer.stop()
        settled = wait_settled(r, ns, list(producer.acked.values()), timeout=60)
        monitor.check_now("final: ")
    out = outcomes(r, ns, ledger, producer.acked, producer.failed)
    states = Counter(job.state for job in out.final.values() if job)
    alive_now = supervisor_pids(sup)
    owner = cluster.owner_of(ns)
    strays = purge_and_find_strays(r, ns, ["work"])
    case.note(out.line())
    case.note(
        f"move windows {', '.join(f'{w:.2f}s' for w in windows)} (keys on old/new owner after: "
        f"{keys_moved}); "
        f"in processing at each move {in_flight}; first job created after a move done "
        f"{', '.join(f'{s:.2f}s' for s in resumed)} after it; longest create {producer.longest:.2f}s; "
        f"producer errors {dict(producer.errors)}; final states {dict(states)}; settled {settled:.2f}s "
        f"after the load; {monitor.checker.snapshots} snapshots ({monitor.skipped} refused while the slot "
        "moved)"
    )
    case.check(
        "no acknowledged job lost (lost = 0, stranded = 0), every one succeeds",
        not out.lost and not out.stranded and states == {"success": len(producer.acked)},
        f"{len(out.lost)}, {len(out.stranded)}, {dict(states)}",
    )
    case.check("unexpected = 0", not out.unexpected, len(out.unexpected))
    case.check(
        "duplicated executions <= jobs in processing when a move began (at-least-once bound)",
        out.extra <= sum(in_flight), f"{out.extra} <= {sum(in_flight)}",
    )
    case.check(
        "no client stuck: no create raised; the longest waited at most its move's window + 1 s",
        not producer.failed and producer.longest <= max(windows) + 1,
        f"{len(producer.failed)} raised, longest {producer.longest:.2f}s",
    )
    case.check(
        "throughput back: a job created after each move completes within 3 s of its end",
        all(s <= 3 for s in resumed), [f"{s:.2f}s" for s in resumed],
    )
    case.check(
        "every key moved: none left on the old owner, the slot served by the last target",
        all(old == 0 for old, _ in keys_moved) and owner.node_id == masters[moves].node_id,
        keys_moved,
    )
    end_case(case, pids, alive_now, monitor, strays)


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case13b_the_namespace_master_killed_under_load(
    size, make_cluster, ledger, start_supervisor, tmp_path
):
    load = 1.5 if size == "quick" else 5.0
    case = Case(
        "13b",
        "the namespace's master SIGKILLed under load; its replica promoted (cluster-node-timeout 2000 ms)",
        f"{RATE} creates/s, {load:g}s before the kill and {load:g}s after the promotion; 2 workers",
    )
    cluster = make_cluster()
    master = cluster.masters()[0]
    ns = cluster.namespace_on(master, "kf")
    r = namespace_client(cluster.url, ns)
    module = handler_module(tmp_path, ledger.path, [(["work"], 2)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=cluster.url, ns=ns)
    pids = supervisor_pids(sup)
    kq = kickq.Kickq(redis_url=cluster.url, redis_namespace=ns, redis_timeout=5)
    producer = Producer(kq, "work", RATE, data={"ms": 2}, opts=OPTS)
    with Monitor(cluster.url, ns, interval=0.3) as monitor:
        producer.start()
        time.sleep(load)  # the load runs: the case's pace, nothing is awaited
        in_flight = r.zcard(Keys(ns).processing)
        acked_before = len(producer.acked)
        promoted = cluster.kill_master(master)
        failover = cluster.failovers[-1]
        # kill_master measures from its SIGKILL (after reading the cluster's state) to the survivors'
        # cluster_state:ok, then returns.
        killed = time.monotonic() - failover.cluster_ok_seconds
        promotion = failover.promotion_seconds
        created_again = wait_until(lambda: producer.sent_after(killed), timeout=30, interval=0.01,
                                   message="a create sent after the kill is acknowledged")
        flow_back = producer.acked_at[created_again[0]] - killed
        resumed = first_completion_after(r, ns, producer, killed, timeout=30)
        time.sleep(load)
        producer.stop()
        settled = wait_settled(r, ns, list(producer.acked.values()), timeout=60)
        monitor.check_now("final: ")
    out = outcomes(r, ns, ledger, producer.acked, producer.failed)
    states = Counter(job.state for job in out.final.values() if job)
    lost_window = [killed - producer.acked_at[ref] for ref in out.lost]
    in_last_second = sum(1 for at in producer.acked_at.values() if killed - 1 <= at <= killed)
    alive_now = supervisor_pids(sup)
    strays = purge_and_find_strays(r, ns, ["work"])
    case.note(out.line())
    case.note(
        f"promoted {promoted} {promotion:.2f}s after the kill; first create sent after it acknowledged "
        f"{flow_back:.2f}s and "
        f"first new job done {resumed:.2f}s after the kill; acknowledged before the kill {acked_before}, "
        f"lost with the master (asynchronous replication) {len(out.lost)}"
        + (f", acknowledged {max(lost_window):.3f}s..{min(lost_window):.3f}s before it"
           if lost_window else "")
        + f"; in processing at the kill {in_flight}; producer errors {dict(producer.errors)}; final states "
        f"{dict(states)}; settled {settled:.2f}s after the load; {monitor.checker.snapshots} snapshots "
        f"({monitor.skipped} skipped while no master served the slot)"
    )
    case.check(
        "a lost acknowledgement is one of the replication window only: acknowledged < 1 s before the kill",
        all(w < 1 for w in lost_window), [f"{w:.3f}s" for w in lost_window][:5],
    )
    case.check(
        "every job that exists ends (stranded = 0); none failed",
        not out.stranded and not states.get("fail"), f"{len(out.stranded)}, {dict(states)}",
    )
    case.check("unexpected = 0", not out.unexpected, len(out.unexpected))
    case.check(
        "duplicated executions <= jobs in processing at the kill + jobs acknowledged in its last second",
        out.extra <= in_flight + in_last_second, f"{out.extra} <= {in_flight} + {in_last_second}",
    )
    case.check(
        "producers and supervisors carry on without restart: creates acknowledged and jobs done within "
        "3 s of the promotion",
        flow_back <= promotion + 3 and resumed <= promotion + 3, f"{flow_back:.2f}s, {resumed:.2f}s",
    )
    end_case(case, pids, alive_now, monitor, strays)
