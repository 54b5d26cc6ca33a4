"""The master's decisions, tick by tick, with a fake clock and fake process operations: no fork,
no Redis, no sleeping."""
from __future__ import annotations

import os
import signal

import pytest

from kickq_supervisor.arbiter import BLAST, QUICK_STOP, TIMED_OUT, Arbiter, Slot


def token(attempt: int) -> str:
    """A run's attempt token (scripts.run_token) for a job created at a fixed time."""
    return f"{attempt}:1700000000000"


def exited(code: int) -> int:
    return code << 8  # a waitpid status for a normal exit


def signalled(sig: int) -> int:
    return int(sig)


class FakeOps:
    def __init__(self) -> None:
        self.now = 100.0
        self.sent: list[tuple[str, int, int]] = []  # (kind, pid, signal)
        self.exits: list[tuple[int, int]] = []

    def monotonic(self) -> float:
        return self.now

    def kill_group(self, pid: int, sig: int) -> None:
        self.sent.append(("group", pid, sig))

    def kill(self, pid: int, sig: int) -> None:
        self.sent.append(("pid", pid, sig))

    def reap(self) -> list[tuple[int, int]]:
        out, self.exits = self.exits, []
        return out


class Harness:
    def __init__(self, slots: int = 2, reaper: bool = True, kill_grace: float = 0.3, jobs: int = 1) -> None:
        self.ops = FakeOps()
        self.next_pid = 1000
        self.lost: list[tuple[int, str, str, str]] = []
        self.spawned: list[int] = []
        self.closed: list[int] = []
        self.arbiter = Arbiter(
            [0] * slots, self.ops, self.spawn_worker, [self.spawn_reaper] if reaper else [],
            lost_job=lambda slot, job_id, token, error: self.lost.append((slot.number, job_id, token, error)),
            kill_grace=kill_grace, close_fd=self.closed.append, spec_jobs=[jobs])

    def spawn_worker(self, slot: Slot) -> tuple[int, int]:
        self.next_pid += 1
        self.spawned.append(self.next_pid)
        return self.next_pid, self.next_pid + 50000

    def spawn_reaper(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def start(self, slot: Slot, job_id: str, run: str = token(1), timeout: float = 1.0) -> None:
        self.arbiter.on_data(slot, f"S {job_id} {run} {self.ops.now:.6f} {timeout}\n".encode())

    def die(self, pid: int, status: int) -> None:
        self.ops.exits.append((pid, status))
        self.arbiter.tick()


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.arbiter.tick()
    return harness


def test_first_tick_fills_every_slot_and_starts_the_reaper(h):
    assert [s.pid for s in h.arbiter.slots] == [1001, 1002]
    assert [r.pid for r in h.arbiter.reapers] == [1003]


def test_a_job_is_killed_at_its_deadline_not_before(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "7", timeout=1.0)
    h.ops.now += 0.999
    h.arbiter.tick()
    assert h.ops.sent == []
    assert h.arbiter.next_wakeup() == pytest.approx(0.001)
    h.ops.now += 0.001
    h.arbiter.tick()
    assert h.ops.sent == [("group", slot.pid, signal.SIGTERM)]


def test_term_escalates_to_kill_after_the_grace_and_the_run_is_ghosted_as_timed_out(h):
    slot = h.arbiter.slots[0]
    pid = slot.pid
    h.start(slot, "7", run=token(3), timeout=1.0)
    h.ops.now += 1.0
    h.arbiter.tick()
    h.ops.now += 0.29
    h.arbiter.tick()
    assert ("group", pid, signal.SIGKILL) not in h.ops.sent
    assert h.arbiter.next_wakeup() == pytest.approx(0.01)
    h.ops.now += 0.01
    h.arbiter.tick()
    assert h.ops.sent[-1] == ("group", pid, signal.SIGKILL)
    h.die(pid, signalled(signal.SIGKILL))
    assert h.lost == [(1, "7", token(3), TIMED_OUT)]
    assert slot.pid not in (None, pid)  # replaced in the same tick


def test_a_job_that_returned_is_not_killed_while_its_outcome_is_saved(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "7", timeout=1.0)
    h.arbiter.on_data(slot, b"F 7\n")
    h.ops.now += 5
    h.arbiter.tick()
    assert h.ops.sent == []


def test_worker_death_mid_job_is_ghosted_at_once_naming_the_signal(h):
    slot = h.arbiter.slots[1]
    pid = slot.pid
    h.start(slot, "9", run=token(2))
    h.die(pid, signalled(signal.SIGKILL))
    assert len(h.lost) == 1
    number, job_id, run, error = h.lost[0]
    assert (number, job_id, run) == (2, "9", token(2))
    assert "SIGKILL" in error and error.startswith("worker died")
    assert slot.pid is not None and slot.pid != pid
    assert h.closed == [pid + 50000]


def test_exit_zero_mid_job_is_a_death_too(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "4")
    h.die(slot.pid, exited(0))
    assert h.lost and "exited with code 0" in h.lost[0][3]


def test_clean_exit_after_a_finished_job_loses_nothing(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "4")
    h.arbiter.on_data(slot, b"F 4\n")
    h.die(slot.pid, exited(0))
    assert h.lost == []


def test_death_after_the_handler_returned_is_ghosted_in_case_the_outcome_was_not_saved(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "4", run=token(5))
    h.arbiter.on_data(slot, b"F 4\n")
    h.die(slot.pid, signalled(signal.SIGKILL))
    assert h.lost and h.lost[0][1:3] == ("4", token(5)) and "saving the outcome" in h.lost[0][3]


def test_messages_split_across_reads_are_reassembled(h):
    slot = h.arbiter.slots[0]
    h.arbiter.on_data(slot, f"S 12 {token(1)} ".encode())
    assert slot.runs == {}
    h.arbiter.on_data(slot, f"{h.ops.now:.6f} 2.5\nF 1".encode())
    run = slot.runs["12"]
    assert list(slot.runs) == ["12"] and run.deadline == h.ops.now + 2.5 and not run.handler_returned


def test_a_worker_dying_young_again_and_again_is_respawned_with_growing_backoff(h):
    slot = h.arbiter.slots[0]
    delays = []
    for _ in range(5):
        h.die(slot.pid, exited(1))
        assert slot.pid is None or len(delays) == 0
        delays.append(slot.respawn_at - h.ops.now)
        h.ops.now = slot.respawn_at
        h.arbiter.tick()
        assert slot.pid is not None
    assert delays == sorted(delays) and delays[-1] > delays[0] > 0


def test_a_worker_that_lived_long_is_respawned_at_once(h):
    slot = h.arbiter.slots[0]
    h.ops.now += 60
    h.die(slot.pid, exited(1))
    assert slot.pid is not None


def test_graceful_stop_asks_workers_to_finish_and_exits_zero_when_all_are_gone(h):
    pids = [s.pid for s in h.arbiter.slots]
    reaper = h.arbiter.reapers[0].pid
    h.start(h.arbiter.slots[0], "1")
    h.arbiter.handle_term()
    assert [("pid", p, signal.SIGUSR1) for p in pids] == [e for e in h.ops.sent if e[2] == signal.SIGUSR1]
    assert ("group", reaper, signal.SIGTERM) in h.ops.sent
    h.die(pids[1], exited(0))
    h.die(reaper, signalled(signal.SIGTERM))
    assert h.arbiter.exit_code is None  # a job is still running
    assert h.arbiter.slots[1].pid is None  # not replaced while stopping
    h.arbiter.on_data(h.arbiter.slots[0], b"F 1\n")
    h.die(pids[0], exited(0))
    assert h.arbiter.exit_code == 0 and h.lost == []


def test_graceful_stop_still_kills_a_job_past_its_deadline(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "1", timeout=1.0)
    h.arbiter.handle_term()
    h.ops.now += 1.0
    h.arbiter.tick()
    assert ("group", slot.pid, signal.SIGTERM) in h.ops.sent


def test_second_int_is_a_quick_stop_that_kills_and_ghosts_and_exits_nonzero(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "1", run=token(4))
    h.arbiter.handle_int()
    assert h.arbiter.stopping and not h.arbiter.quick
    h.arbiter.handle_int()
    assert h.arbiter.quick
    assert ("group", slot.pid, signal.SIGKILL) in h.ops.sent
    for s in h.arbiter.slots:
        h.ops.exits.append((s.pid, signalled(signal.SIGKILL)))
    h.ops.exits.append((h.arbiter.reapers[0].pid, signalled(signal.SIGTERM)))
    h.arbiter.tick()
    assert h.lost == [(1, "1", token(4), QUICK_STOP)]
    assert h.arbiter.exit_code == 1


class FakeCheck:
    def __init__(self) -> None:
        self.answer: bool | None = None

    def poll(self) -> bool | None:
        return self.answer


def test_hup_checks_imports_without_blocking_and_is_ignored_when_they_fail(h):
    check = FakeCheck()
    h.arbiter.start_reload_check = lambda: check
    h.arbiter.handle_hup()
    h.arbiter.tick()
    assert not h.arbiter.stopping  # still checking: the master keeps working meanwhile
    h.arbiter.handle_hup()  # a second HUP while checking starts nothing new
    check.answer = False
    h.arbiter.tick()
    assert not h.arbiter.stopping and not h.arbiter.reload_requested and h.arbiter.reload_check is None


def test_hup_drains_the_workers_for_a_reload_once_the_check_passes(h):
    check = FakeCheck()
    h.arbiter.start_reload_check = lambda: check
    h.arbiter.handle_hup()
    check.answer = True
    h.arbiter.tick()
    assert h.arbiter.stopping and h.arbiter.reload_requested


def test_exit_code_3_is_a_death_like_any_other(h):
    slot = h.arbiter.slots[0]
    h.start(slot, "8", run=token(2))
    h.die(slot.pid, exited(3))
    assert not h.arbiter.stopping
    assert h.lost and "exited with code 3" in h.lost[0][3]
    assert slot.pid is not None  # replaced


def test_every_worker_exit_settles_what_it_held_and_only_a_known_run_is_ghosted(h):
    claims = []
    h.arbiter.lost_claim = lambda slot, error: claims.append((slot.number, error))
    slot = h.arbiter.slots[1]
    h.die(slot.pid, signalled(signal.SIGKILL))
    assert h.lost == [] and claims and claims[0][0] == 2 and "SIGKILL" in claims[0][1]
    # a clean exit settles everything itself; the settling (token-checked) is asked for anyway
    h.die(h.arbiter.slots[0].pid, exited(0))
    assert h.lost == [] and [c[0] for c in claims] == [2, 1]


def test_an_outcome_reported_with_the_f_message_is_saved_not_ghosted(h):
    settled = []
    h.arbiter.lost_claim = lambda slot, error: settled.append(dict(slot.unsaved))
    slot = h.arbiter.slots[0]
    pid = slot.pid
    h.start(slot, "7", timeout=5.0)
    h.arbiter.on_message(slot, 'F 7 success 0.002 "{\\"n\\": 1}"')
    h.die(pid, signalled(signal.SIGKILL))
    assert h.lost == []  # its outcome came with the F message: saved by lost_claim, not ghosted
    assert settled[0]["7"][:3] == (token(1), "success", '{"n": 1}')


def test_a_finished_run_whose_outcome_the_master_does_not_hold_is_ghosted(h):
    slot = h.arbiter.slots[0]
    pid = slot.pid
    h.start(slot, "7", timeout=5.0)
    h.arbiter.on_message(slot, "F 7 success 0.002")  # too big to come along
    h.die(pid, signalled(signal.SIGKILL))
    assert [item[1] for item in h.lost] == ["7"] and "saving the outcome" in h.lost[0][3]


def test_a_run_whose_big_outcome_was_not_saved_is_ghosted_after_the_next_start_replaced_it(h):
    """The F of a run whose outcome is too big for the pipe comes with the next job's S; the outcome
    leaves in the worker's next call. A worker that dies before it has a run that ended and a run
    told started: the first goes to the abandon as a ghost (token-checked: harmless if Redis has its
    outcome), so a job that ran is never given back as one that never began."""
    settled = []
    h.arbiter.lost_claim = lambda slot, error: settled.append(dict(slot.unsaved))
    slot = h.arbiter.slots[0]
    pid = slot.pid
    h.start(slot, "7", timeout=5.0)
    h.arbiter.on_data(slot, f"F 7 success 0.002\nS 8 {token(1)} {h.ops.now:.6f} 5.0 w\n".encode())
    h.die(pid, signalled(signal.SIGKILL))
    assert [item[1] for item in h.lost] == ["8"]  # told started: ghosted by the master
    assert settled[0]["7"][:3] == (token(1), "ghost", "worker died while saving the outcome")


def test_a_grandchild_group_still_gets_the_kill_when_the_worker_died_of_the_term(h):
    slot = h.arbiter.slots[0]
    pid = slot.pid
    h.start(slot, "7", timeout=1.0)
    h.ops.now += 1.0
    h.arbiter.tick()
    h.die(pid, signalled(signal.SIGTERM))
    assert ("group", pid, signal.SIGKILL) not in h.ops.sent
    h.ops.now += 0.3
    h.arbiter.tick()
    assert ("group", pid, signal.SIGKILL) in h.ops.sent


def test_a_dead_reaper_is_restarted(h):
    old = h.arbiter.reapers[0].pid
    h.ops.now += 10
    h.die(old, signalled(signal.SIGKILL))
    assert h.arbiter.reapers[0].pid not in (None, old)


def two_reapers() -> tuple[Harness, list[str]]:
    """A harness whose arbiter keeps two reapers (two Redis servers), and which reaper each spawn was."""
    h = Harness(reaper=False)
    spawned: list[str] = []

    def spawner(which: str):
        def spawn() -> int:
            spawned.append(which)
            return h.spawn_reaper()
        return spawn
    h.arbiter = Arbiter([0, 0], h.ops, h.spawn_worker, [spawner("A"), spawner("B")],
                        lost_job=lambda *args: None, close_fd=h.closed.append)
    h.arbiter.tick()
    return h, spawned


def test_one_reaper_per_spawn_callable_each_restarted_on_its_own():
    h, spawned = two_reapers()
    a, b = h.arbiter.reapers
    assert spawned == ["A", "B"] and a.pid and b.pid and a.pid != b.pid
    b_pid = b.pid
    for _ in range(4):  # A crash-loops: its backoff grows; B is left alone
        h.die(a.pid, exited(1))
        assert a.pid is None and a.respawn_at > h.ops.now
        assert h.arbiter.next_wakeup(cap=60) == pytest.approx(a.respawn_at - h.ops.now)
        h.ops.now = a.respawn_at
        h.arbiter.tick()
        assert a.pid is not None
    assert (a.failures, b.failures) == (4, 0)
    assert spawned == ["A", "B", "A", "A", "A", "A"] and b.pid == b_pid
    h.ops.now += 10
    h.die(b.pid, signalled(signal.SIGKILL))  # an old reaper dies: restarted at once
    assert b.pid not in (None, b_pid) and b.failures == 0 and spawned[-1] == "B"


def test_a_graceful_stop_ends_every_reaper_and_waits_for_all_of_them():
    h, _ = two_reapers()
    reapers = [r.pid for r in h.arbiter.reapers]
    h.arbiter.handle_term()
    assert all(("group", pid, signal.SIGTERM) in h.ops.sent for pid in reapers)
    for slot in h.arbiter.slots:
        h.die(slot.pid, exited(0))
    h.die(reapers[0], signalled(signal.SIGTERM))
    assert h.arbiter.exit_code is None  # the other reaper is still running
    h.die(reapers[1], signalled(signal.SIGTERM))
    assert h.arbiter.exit_code == 0
    assert [r.pid for r in h.arbiter.reapers] == [None, None]  # not restarted while stopping


def test_unknown_children_are_ignored(h):
    h.die(4242, exited(0))
    assert h.lost == [] and all(s.pid for s in h.arbiter.slots)


def test_next_wakeup_is_capped_and_never_negative(h):
    assert h.arbiter.next_wakeup(cap=1.0) == 1.0
    slot = h.arbiter.slots[0]
    h.start(slot, "1", timeout=0.5)
    h.ops.now += 2
    assert h.arbiter.next_wakeup() == 0.0


def test_waitpid_status_helpers_match_the_os():
    assert os.WIFEXITED(exited(5)) and os.WEXITSTATUS(exited(5)) == 5
    assert os.WIFSIGNALED(signalled(signal.SIGKILL))


def test_a_death_after_the_handler_returned_also_ghosts_the_chained_claim(h):
    claims = []
    h.arbiter.lost_claim = lambda slot, error: claims.append(slot.number)
    slot = h.arbiter.slots[0]
    h.start(slot, "4", run=token(5))
    h.arbiter.on_data(slot, b"F 4\n")
    h.die(slot.pid, signalled(signal.SIGKILL))
    assert h.lost and h.lost[0][1] == "4" and claims == [1]


# --- dense workers (jobs_per_worker > 1) --------------------------------------------------------------

@pytest.fixture
def dense() -> Harness:
    harness = Harness(slots=1, reaper=False, jobs=8)
    harness.arbiter.tick()
    return harness


def test_a_dense_worker_gets_the_kill_grace_to_cancel_a_job_itself(dense):
    slot = dense.arbiter.slots[0]
    assert slot.jobs == 8
    dense.start(slot, "1", timeout=1.0)
    dense.start(slot, "2", timeout=5.0)
    dense.ops.now += 1.0  # job 1's deadline: the worker cancels its task now
    dense.arbiter.tick()
    assert dense.ops.sent == []
    assert dense.arbiter.next_wakeup() == pytest.approx(0.3)
    dense.arbiter.on_data(slot, b'F 1 ghost 1.000000 "processing timed out"\n')
    dense.ops.now += 0.3
    dense.arbiter.tick()
    assert dense.ops.sent == [] and slot.unsaved["1"][:3] == (token(1), "ghost", TIMED_OUT)
    assert [r.job_id for r in slot.running()] == ["2"]


def test_a_dense_worker_whose_job_ignores_its_deadline_is_killed_and_every_job_in_it_ghosted(dense):
    slot = dense.arbiter.slots[0]
    pid = slot.pid
    for job_id, timeout in (("1", 1.0), ("2", 5.0), ("3", 5.0), ("4", 5.0)):
        dense.start(slot, job_id, run=f"1:{job_id}", timeout=timeout)
    dense.arbiter.on_data(slot, b'F 4 success 0.010000 ""\n')  # returned, its outcome retained
    dense.ops.now += 1.0 + 0.29
    dense.arbiter.tick()
    assert dense.ops.sent == []  # not before the deadline and the grace
    dense.ops.now += 0.01
    dense.arbiter.tick()
    assert dense.ops.sent == [("group", pid, signal.SIGTERM)]
    dense.ops.now += 0.3
    dense.arbiter.tick()
    assert dense.ops.sent[-1] == ("group", pid, signal.SIGKILL)
    dense.die(pid, signalled(signal.SIGKILL))
    assert sorted(dense.lost) == [(1, "1", "1:1", TIMED_OUT), (1, "2", "1:2", BLAST.format("1")),
                                  (1, "3", "1:3", BLAST.format("1"))]
    assert BLAST.format("1") == "worker killed: job 1 passed its deadline"


def test_a_quick_stop_ghosts_every_job_of_a_dense_worker(dense):
    slot = dense.arbiter.slots[0]
    dense.start(slot, "1")
    dense.start(slot, "2")
    dense.arbiter.handle_quit()
    dense.die(slot.pid, signalled(signal.SIGKILL))
    assert sorted(dense.lost) == [(1, "1", token(1), QUICK_STOP), (1, "2", token(1), QUICK_STOP)]


def test_a_dense_worker_that_dies_ghosts_each_job_it_was_running(dense):
    slot = dense.arbiter.slots[0]
    dense.start(slot, "1")
    dense.start(slot, "2")
    dense.arbiter.on_data(slot, b'F 1 fail 0.100000 "boom"\n')
    dense.die(slot.pid, signalled(signal.SIGSEGV))
    assert [lost[1] for lost in dense.lost] == ["2"] and "worker died" in dense.lost[0][3]


def test_a_one_job_worker_is_still_killed_at_the_deadline_itself(h):
    slot = h.arbiter.slots[0]
    assert slot.jobs == 1
    h.start(slot, "1", timeout=1.0)
    h.ops.now += 1.0
    h.arbiter.tick()
    assert ("group", slot.pid, signal.SIGTERM) in h.ops.sent
