"""A real Redis master with one replica, for the tests of writes that replicas confirm (wait_replicas).

`ReplicaPair.start(dir)` starts both (tests.helpers.start_redis; the replica with --replicaof) and
returns once the replica is online and holds everything the master wrote. `frozen()` SIGSTOPs the
replica for the duration of a with-block: the master still counts it as connected (its link times
out only after repl-timeout, 60 s), so a WAIT for it waits its whole timeout and confirms nothing.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from tests.helpers import log_tail, poll_until, start_redis, stop_redis

HOST = "127.0.0.1"


class ReplicaPairError(RuntimeError):
    """The pair did not reach the state awaited (the message has the log tails)."""


class ReplicaPair:
    def __init__(self, workdir: Path, master: subprocess.Popen, master_port: int, replica: subprocess.Popen,
                 replica_port: int) -> None:
        self.workdir = workdir
        self.master_proc, self.master_port = master, master_port
        self.replica_proc, self.replica_port = replica, replica_port
        self.master_url = f"redis://{HOST}:{master_port}/0"
        self.replica_url = f"redis://{HOST}:{replica_port}/0"
        # Bounded waits: the replica may be frozen while a test holds these.
        self.master = redis.Redis(host=HOST, port=master_port, decode_responses=True, socket_timeout=5)
        self.replica = redis.Redis(host=HOST, port=replica_port, decode_responses=True, socket_timeout=5)

    @classmethod
    def start(cls, workdir: Path) -> "ReplicaPair":
        master, master_port = start_redis(workdir / "master", host=HOST)
        try:
            replica, replica_port = start_redis(workdir / "replica", "--replicaof", HOST, str(master_port),
                                                host=HOST)
        except BaseException:
            stop_redis(master)
            raise
        pair = cls(workdir, master, master_port, replica, replica_port)
        try:
            pair.wait_synced()
        except BaseException:
            pair.stop()
            raise
        return pair

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{log_tail(path)}" for name, path in (
            ("master", self.workdir / "master" / f"redis-{self.master_port}.log"),
            ("replica", self.workdir / "replica" / f"redis-{self.replica_port}.log")))

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Until the replica is online and has acknowledged the master's whole replication stream."""
        def synced() -> bool:
            info = self.master.info("replication")
            replica = info.get("slave0")
            return (isinstance(replica, dict) and replica.get("state") == "online"
                    and int(replica.get("offset", -1)) == int(info["master_repl_offset"]))
        poll_until(synced, timeout, "the replica is online and up to date", self.logs, ReplicaPairError)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The replica SIGSTOPped for the block; thawed and caught up after it."""
        self.replica_proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.replica_proc.send_signal(signal.SIGCONT)
        self.wait_synced()

    def waits(self) -> int:
        """How many WAIT commands the master has run (INFO commandstats)."""
        return int(self.master.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))

    def namespace_keys(self, client: Any, namespace: str) -> list[str]:
        """Every key of `namespace` on `client`'s server (a test helper: SCAN, not KEYS)."""
        return sorted(client.scan_iter(match=f"{{{namespace}}}*", count=1000))

    def stop(self) -> None:
        for client in (self.master, self.replica):
            client.close()
        for proc in (self.replica_proc, self.master_proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen one too
            stop_redis(proc)
