"""A real Redis Sentinel setup on loopback ports, for the test session and for bench/.

Pure redis-py plus the ``redis-server`` binary; kickq is not imported.

    setup = start_sentinel_setup(tmpdir)     # 1 master + 2 replicas + 3 sentinels, settled
    setup.url                                # redis+sentinel://127.0.0.1:S1,...,127.0.0.1:S3/kq
    old = setup.master()
    new = setup.kill_master()                # SIGKILL; returns the promoted replica
    setup.restart(old)                       # comes back; Sentinel makes it a replica of `new`
    setup.failover()                         # SENTINEL FAILOVER, a planned switch
    setup.freeze_all_data_nodes(); setup.thaw_all_data_nodes()
    setup.stop()

``start_sentinel_setup(tmpdir, tls=make_certs(dir))`` starts a setup that speaks TLS only:
every data node's and sentinel's one port is a TLS port (``port 0``, ``tls-port``), and
``tls-replication yes`` makes replicas connect to their master over TLS and sentinels
connect to the data nodes and to each other over TLS (Redis' TLS docs, "Sentinel"; in
sentinel.c a sentinel's links negotiate TLS when tls-replication is set, and its hellos
announce its tls-port). ``SentinelSetup.url`` is ``rediss+sentinel://...``; the setup's own
clients and pings verify the nodes against ``tls["ca.crt"]`` and, as any client, need no
certificate of their own (``tls-auth-clients no``).

Every process runs in the foreground (``daemonize no``) on a free loopback port, in its
own directory ``<tmpdir>/<kind>-<port>/`` holding its config file and ``redis.log``. Data
nodes read their settings from a config file too, so that the ``REPLICAOF`` + ``CONFIG
REWRITE`` Sentinel sends a node it reconfigures is kept across ``restart`` as in a real
deployment. Each sentinel gets its own writable copy: Sentinel rewrites its file.

Timings Sentinel imposes (Redis 7.0 source, sentinel.c), which the waits here allow for:
a sentinel asks a replica for INFO every 10 s (every 1 s only while the master is down or
being failed over), and it turns a node that says master but should be a replica into a
replica only once that node has said so for more than 8 s (4 hello periods). So a node
restarted after a kill, and the old master after ``SENTINEL FAILOVER``, stay masters for
about 10-20 s: writes a client sends there in that window are lost unless it waits for a
replica (``WAIT``). ``failovers`` records each switch's times (``FailoverTimes``).

Measured 2026-12-08 on the shared 2-core dev machine (Redis 7.0.15, redis-py 8.2.0 and
5.0.1, defaults above), with ``pytest tests/test_sentinel_topology.py -s`` and loops of
the helpers (8 kills, 4 freezes and planned failovers):

    start_sentinel_setup          2.1-2.3 s (data nodes 0.05 s; sentinels meeting: hellos every 2 s)
    kill_master: promoted         2.2-2.35 s (all sentinels name it, it says master)
                 settled          4.2 s (the other replica follows it)
    restart(killed master)        10.2-12.2 s until Sentinel makes it a replica
    failover(): promoted          1.1-1.25 s
                old master demoted 11.2-11.4 s; it accepted writes until 10.0 s after the promotion
    freeze all data nodes         every sentinel says s_down after 2.0 s
    thaw -> settled               0.1 s, or 11.3 s when Sentinel failed over meanwhile (1 in 4):
                                  the thawed old master then accepts writes as a second master
                                  until Sentinel demotes it

Once (1 in 12), restarting the killed master right after the promotion, before the other
replica followed the new master, was followed by a second failover (FailoverTimes.
first_promoted); kill_master now returns only once the setup is settled.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import log_tail, poll_until, free_port, ping, redis_server_binary
from tests.topology import TlsFiles

T = TypeVar("T")

HOST = "127.0.0.1"
# Everything start_sentinel_setup does must fit in this (a loaded 2-core machine takes a
# few seconds; the margin is for a machine busy with other test sessions).
START_TIMEOUT = 60.0
POLL_INTERVAL = 0.05
# A poll must not hang on a frozen (SIGSTOPped) node.
ADMIN_SOCKET_TIMEOUT = 2.0


class SentinelSetupError(RuntimeError):
    """The setup did not reach the state a helper waited for (the message has the log tails)."""


@dataclass(eq=False)
class Node:
    """One redis-server process: a data node (master or replica) or a sentinel."""

    kind: str  # "data" or "sentinel"
    port: int
    workdir: Path
    host: str = HOST
    process: subprocess.Popen | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def conf(self) -> Path:
        return self.workdir / f"{self.kind}.conf"

    @property
    def logfile(self) -> Path:
        return self.workdir / "redis.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        return f"<Node {self.kind} {self.host}:{self.port}>"


@dataclass
class FailoverTimes:
    """What kill_master/failover measured, in seconds from the SIGKILL or SENTINEL FAILOVER."""

    kind: str  # "kill" or "planned"
    old_master: Node
    new_master: Node
    promoted_seconds: float  # every sentinel names the new master and it says role master
    # ... and the setup is settled (SentinelSetup.settled): the other replicas follow it
    settled_seconds: float = 0.0
    # The master the sentinels first agreed on, when it differs from new_master: a second
    # failover followed the first (seen here with down-after 1000 ms on a loaded machine:
    # one sentinel wrongly flags the new master down within a second, and the others'
    # "down" answers about the old master, which Sentinel keeps, make that objective at once).
    first_promoted: Node | None = None
    # planned only: the old master says role slave of the new master
    old_master_demoted_seconds: float | None = None
    # planned only: the last write the old master accepted after the new master was named
    # by every sentinel (0.0 if it accepted none then; None if not probed)
    old_master_writable_after_promotion_seconds: float | None = None


def _pairs(reply: Sequence[Any] | Mapping[Any, Any]) -> dict[str, str]:
    """A SENTINEL MASTER / REPLICAS / SENTINELS entry as a dict: the server sends a flat
    name, value list, which some redis-py versions already turn into a dict."""
    if isinstance(reply, Mapping):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _poll(
    predicate: Callable[[], T | None], timeout: float, what: str, details: Callable[[], str]
) -> T:
    """Call ``predicate`` until it returns something truthy; a RedisError counts as not yet."""
    return poll_until(predicate, timeout, what, details, error=SentinelSetupError, interval=POLL_INTERVAL)


def _port_lines(port: int, tls: TlsFiles | None) -> list[str]:
    """A node's one port: plain, or (``tls``) a TLS port with no plain one (module docstring).
    The node's certificate is also its client certificate on its own outgoing links."""
    if not tls:
        return [f"port {port}"]
    return [
        "port 0",
        f"tls-port {port}",
        f'tls-cert-file "{tls["server.crt"]}"',
        f'tls-key-file "{tls["server.key"]}"',
        f'tls-ca-cert-file "{tls["ca.crt"]}"',
        "tls-auth-clients no",
        "tls-replication yes",
    ]


def _tls_options(tls: TlsFiles | None) -> dict[str, Any]:
    """redis-py options of a client of a node (none for a plain setup)."""
    return {"ssl": True, "ssl_ca_certs": str(tls["ca.crt"])} if tls else {}


def _write_data_conf(node: Node, replica_of: Node | None, tls: TlsFiles | None = None) -> None:
    node.workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"bind {node.host}",
        *_port_lines(node.port, tls),
        f'dir "{node.workdir}"',
        "daemonize no",
        'save ""',
        "appendonly no",
        # A replica's first sync starts at once instead of after Redis' default 5 s.
        "repl-diskless-sync-delay 0",
        # Replication offsets (what Sentinel uses to pick a replica) move every second
        # on an idle master instead of every 10 s.
        "repl-ping-replica-period 1",
    ]
    if replica_of is not None:
        lines.append(f"replicaof {replica_of.host} {replica_of.port}")
    node.conf.write_text("\n".join(lines) + "\n")


def _write_sentinel_conf(
    node: Node,
    service: str,
    master: Node,
    quorum: int,
    down_after_ms: int,
    failover_timeout_ms: int,
    tls: TlsFiles | None = None,
) -> None:
    node.workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"bind {node.host}",
        *_port_lines(node.port, tls),
        f'dir "{node.workdir}"',
        "daemonize no",
        "sentinel resolve-hostnames no",
        f"sentinel monitor {service} {master.host} {master.port} {quorum}",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {failover_timeout_ms}",
        f"sentinel parallel-syncs {service} 1",
    ]
    node.conf.write_text("\n".join(lines) + "\n")


def _spawn(binary: str, node: Node) -> subprocess.Popen:
    cmd = [binary, str(node.conf)] + (["--sentinel"] if node.kind == "sentinel" else [])
    with open(node.logfile, "ab") as log:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=node.workdir
        )


class SentinelSetup:
    """A running master, its replicas and the sentinels watching them (start_sentinel_setup)."""

    def __init__(
        self,
        root: Path,
        redis_server: str,
        service: str,
        replicas: int,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        tls: TlsFiles | None = None,
    ) -> None:
        self.root = root
        self.tls = tls
        self.redis_server = redis_server
        self.service = service
        self.expected_replicas = replicas
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data_nodes: list[Node] = []
        self.sentinels: list[Node] = []
        self.failovers: list[FailoverTimes] = []
        self.startup_seconds = 0.0
        self.startup_phases: dict[str, float] = {}
        self.restart_seconds: list[float] = []
        self._clients: dict[int, redis.Redis] = {}
        self._admins: dict[int, redis.Redis] = {}
        self._taken_ports: set[int] = set()

    # -- addresses and clients ------------------------------------------------

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{self.service}"

    def answers(self, node: Node) -> bool:
        """``node`` answers PING (over TLS, verified against the test CA, in a TLS setup)."""
        return ping(node.host, node.port, tls_ca=self.tls["ca.crt"] if self.tls else None)

    def node(self, port: int) -> Node:
        for n in self.data_nodes + self.sentinels:
            if n.port == port:
                return n
        raise SentinelSetupError(f"no node of this setup on port {port}")

    def client(self, node: Node) -> redis.Redis:
        """A plain redis-py client of ``node`` (decode_responses=True), cached."""
        c = self._clients.get(node.port)
        if c is None:
            c = self._clients[node.port] = redis.Redis(
                host=node.host, port=node.port, decode_responses=True, **_tls_options(self.tls)
            )
        return c

    def admin(self, node: Node) -> redis.Redis:
        """A client for the polls: no retries and a short timeout (a killed or frozen node
        must fail the poll at once, not after redis-py's reconnect backoff)."""
        c = self._admins.get(node.port)
        if c is None:
            c = self._admins[node.port] = redis.Redis(
                host=node.host,
                port=node.port,
                decode_responses=True,
                socket_timeout=ADMIN_SOCKET_TIMEOUT,
                socket_connect_timeout=ADMIN_SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                **_tls_options(self.tls),
            )
        return c

    # -- what the sentinels and the nodes say ---------------------------------

    def master_addr(self, sentinel: Node) -> tuple[str, int] | None:
        reply = self.admin(sentinel).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return (str(reply[0]), int(reply[1])) if reply else None

    def sentinel_master(self, sentinel: Node) -> dict[str, str]:
        return _pairs(self.admin(sentinel).execute_command("SENTINEL", "MASTER", self.service))

    def sentinel_replicas(self, sentinel: Node) -> list[dict[str, str]]:
        reply = self.admin(sentinel).execute_command("SENTINEL", "REPLICAS", self.service)
        return [_pairs(r) for r in reply]

    def sentinel_sentinels(self, sentinel: Node) -> list[dict[str, str]]:
        reply = self.admin(sentinel).execute_command("SENTINEL", "SENTINELS", self.service)
        return [_pairs(r) for r in reply]

    def role(self, node: Node) -> list[Any]:
        """ROLE: ["master", offset, replicas] or ["slave", host, port, state, offset]."""
        return list(self.admin(node).execute_command("ROLE"))

    def named_master(self) -> Node | None:
        """The data node every running sentinel names as master, or None if they disagree."""
        addrs = {self.master_addr(s) for s in self.sentinels if s.running()}
        if len(addrs) != 1:
            return None
        addr = addrs.pop()
        return self.node(addr[1]) if addr else None

    def master(self) -> Node:
        """The master as a sentinel names it (SENTINEL GET-MASTER-ADDR-BY-NAME)."""
        errors = []
        for s in self.sentinels:
            if not s.running():
                continue
            try:
                addr = self.master_addr(s)
            except redis.RedisError as exc:
                errors.append(f"{s}: {exc}")
                continue
            if addr is not None:
                return self.node(addr[1])
        raise SentinelSetupError(f"no sentinel names a master: {errors}")

    def replicas(self) -> list[Node]:
        """The running data nodes other than the master."""
        master = self.master()
        return [n for n in self.data_nodes if n is not master and n.running()]

    def _replica_following(self, node: Node, master: Node) -> bool:
        role = self.role(node)
        return role[0] == "slave" and int(role[2]) == master.port and role[3] == "connected"

    def settled(self) -> Node | None:
        """The master, if the whole setup is settled: every running sentinel names it,
        it says role master, every other running data node is its replica with the link up,
        and every sentinel sees those replicas (none down) and the other sentinels."""
        master = self.named_master()
        if master is None or not master.running() or self.role(master)[0] != "master":
            return None
        replicas = [n for n in self.data_nodes if n is not master and n.running()]
        if not all(self._replica_following(r, master) for r in replicas):
            return None
        replica_ports = {r.port for r in replicas}
        others = len([s for s in self.sentinels if s.running()]) - 1
        for s in self.sentinels:
            if not s.running():
                continue
            info = self.sentinel_master(s)
            if info.get("flags") != "master" or int(info.get("num-other-sentinels", -1)) != others:
                return None
            healthy = {
                int(r["port"]) for r in self.sentinel_replicas(s) if r.get("flags") == "slave"
            }
            if not replica_ports <= healthy:
                return None
            if len(self.sentinel_sentinels(s)) != others:
                return None
        return master

    def wait_settled(self, timeout: float = START_TIMEOUT) -> Node:
        return _poll(self.settled, timeout, "the setup is settled", self.logs)

    def logs(self, lines: int = 15) -> str:
        parts = []
        for n in self.data_nodes + self.sentinels:
            state = "running" if n.running() else f"exited {n.process.poll() if n.process else None}"
            parts.append(f"--- {n} ({state}) {n.logfile}\n{log_tail(n.logfile, lines)}")
        return "\n".join(parts)

    # -- starting -------------------------------------------------------------

    def _fresh_port(self) -> int:
        while True:
            port = free_port(HOST)
            if port not in self._taken_ports:
                self._taken_ports.add(port)
                return port

    def _launch(self, make: Callable[[int], Node], deadline: float, attempts: int = 5) -> Node:
        """Start a node on a fresh port (a new one if the port was taken before it bound)."""
        failures = []
        for _ in range(attempts):
            node = make(self._fresh_port())
            node.process = _spawn(self.redis_server, node)
            while time.monotonic() < deadline and node.running() and not self.answers(node):
                time.sleep(0.01)
            if node.running() and self.answers(node):
                return node
            if node.process.poll() is None:
                node.process.kill()
            node.process.wait(timeout=30)
            failures.append(f"{node}: exit code {node.process.returncode}\n{log_tail(node.logfile, 5)}")
            shutil.rmtree(node.workdir, ignore_errors=True)
            if time.monotonic() >= deadline:
                break
        raise SentinelSetupError("could not start a node:\n" + "\n".join(failures))

    def _start(self, sentinels: int, deadline: float) -> None:
        started = time.monotonic()

        def data_node(replica_of: Node | None) -> Callable[[int], Node]:
            def make(port: int) -> Node:
                node = Node("data", port, self.root / f"data-{port}")
                _write_data_conf(node, replica_of, self.tls)
                return node
            return make

        master = self._launch(data_node(None), deadline)
        self.data_nodes.append(master)
        for _ in range(self.expected_replicas):
            self.data_nodes.append(self._launch(data_node(master), deadline))
        # Sentinels learn the replicas from the master's INFO, which they ask for at once
        # on connecting and then only every 10 s: start them once the replicas are attached.
        _poll(
            lambda: all(self._replica_following(r, master) for r in self.data_nodes[1:]),
            deadline - time.monotonic(),
            "every replica's link to the master is up",
            self.logs,
        )
        self.startup_phases["data_nodes"] = time.monotonic() - started

        t = time.monotonic()

        def sentinel(port: int) -> Node:
            node = Node("sentinel", port, self.root / f"sentinel-{port}")
            _write_sentinel_conf(
                node,
                self.service,
                master,
                self.quorum,
                self.down_after_ms,
                self.failover_timeout_ms,
                self.tls,
            )
            return node

        for _ in range(sentinels):
            self.sentinels.append(self._launch(sentinel, deadline))
        # Sentinels find each other through hello messages on the master, every 2 s.
        self.wait_settled(deadline - time.monotonic())
        self.startup_phases["sentinels"] = time.monotonic() - t
        self.startup_seconds = time.monotonic() - started

    # -- failures -------------------------------------------------------------

    def kill_master(self, timeout: float = 60.0) -> Node:
        """SIGKILL the master; return the replica Sentinel promotes, once every running
        sentinel names it, it says role master and the setup is settled (the other replicas
        follow it). Times in ``failovers``; the returned master is the settled one, which
        is not the first promoted if Sentinel failed over twice (FailoverTimes)."""
        old = self.master()
        if not old.running() or old.process is None:
            raise SentinelSetupError(f"{old} is not a running process of this setup")
        started = time.monotonic()
        old.process.send_signal(signal.SIGKILL)
        old.process.wait(timeout=30)

        def promoted() -> Node | None:
            new = self.named_master()
            if new is None or new is old or not new.running():
                return None
            return new if self.role(new)[0] == "master" else None

        first = _poll(promoted, timeout, f"a replica of {old} is promoted", self.logs)
        promoted_seconds = time.monotonic() - started
        new = self.wait_settled(timeout)
        self.failovers.append(
            FailoverTimes(
                "kill",
                old,
                new,
                promoted_seconds,
                settled_seconds=time.monotonic() - started,
                first_promoted=first if first is not new else None,
            )
        )
        return new

    def failover(self, timeout: float = 60.0, probe_writes: bool = True) -> Node:
        """SENTINEL FAILOVER (a planned switch); return the new master once every running
        sentinel names it, the old master says role slave of it and the setup is settled.

        With ``probe_writes`` a SET goes to the old master at every poll, to measure how
        long after the promotion it still accepts writes (a key ``sentinel-probe``)."""
        old = self.master()
        sentinel = next(s for s in self.sentinels if s.running())
        probe = self.client(old) if probe_writes else None
        started = time.monotonic()
        self.admin(sentinel).execute_command("SENTINEL", "FAILOVER", self.service)
        promoted_at: float | None = None
        last_write_at: float | None = None
        new: Node | None = None

        def switched() -> bool:
            nonlocal promoted_at, last_write_at, new
            if probe is not None:
                try:
                    probe.set("sentinel-probe", "x")
                    last_write_at = time.monotonic()
                except redis.RedisError:
                    pass
            if promoted_at is None:
                named = self.named_master()
                if named is None or named is old or self.role(named)[0] != "master":
                    return False
                new, promoted_at = named, time.monotonic()
            # The current master, in case Sentinel failed over once more (FailoverTimes).
            current = self.named_master()
            return current is not None and current is not old and self._replica_following(old, current)

        _poll(switched, timeout, f"{old} is replaced and follows the new master", self.logs)
        assert new is not None and promoted_at is not None
        writable: float | None = None
        if probe_writes:
            writable = max(0.0, last_write_at - promoted_at) if last_write_at is not None else 0.0
        demoted_seconds = time.monotonic() - started
        settled = self.wait_settled(timeout)
        self.failovers.append(
            FailoverTimes(
                "planned",
                old,
                settled,
                promoted_at - started,
                settled_seconds=time.monotonic() - started,
                first_promoted=new if new is not settled else None,
                old_master_demoted_seconds=demoted_seconds,
                old_master_writable_after_promotion_seconds=writable,
            )
        )
        return settled

    def freeze_all_data_nodes(self) -> None:
        """SIGSTOP every running data node (no master, no replica answers)."""
        for n in self.data_nodes:
            if n.running() and n.process is not None:
                n.process.send_signal(signal.SIGSTOP)

    def wait_until_master_down(self, timeout: float = 30.0) -> None:
        """Wait until every running sentinel flags the master subjectively down (s_down)."""
        _poll(
            lambda: all(
                "s_down" in self.sentinel_master(s).get("flags", "").split(",")
                for s in self.sentinels
                if s.running()
            ),
            timeout,
            "every sentinel says the master is down",
            self.logs,
        )

    def thaw_all_data_nodes(self) -> None:
        """SIGCONT every data node; the caller waits for what it needs (wait_settled). If the
        freeze lasted past down-after, Sentinel may promote a replica after the thaw: ask
        ``master()``, never remember the one from before."""
        for n in self.data_nodes:
            if n.running() and n.process is not None:
                n.process.send_signal(signal.SIGCONT)
        # Connections that timed out mid-reply while the node was stopped are unusable.
        self.close_clients()

    def restart(self, node: Node, timeout: float = 60.0) -> Node:
        """Start a stopped data node again on its port with its directory and config file;
        return once Sentinel has made it a replica of the current master (link up) and
        every sentinel lists it as a healthy replica (seconds in ``restart_seconds``)."""
        if node.running():
            raise SentinelSetupError(f"{node} is still running")
        if node.kind != "data":
            raise SentinelSetupError(f"{node}: only data nodes are restarted")
        started = time.monotonic()
        node.process = _spawn(self.redis_server, node)
        _poll(
            lambda: node.running() and self.answers(node),
            timeout,
            f"{node} answers PING again",
            lambda: f"exit code {node.process.poll() if node.process else None}\n{log_tail(node.logfile)}",
        )
        for cache in (self._clients, self._admins):
            stale = cache.pop(node.port, None)
            if stale is not None:
                stale.close()

        def reconfigured() -> bool:
            master = self.settled()
            return master is not None and master is not node

        _poll(reconfigured, timeout, f"{node} is a replica of the master again", self.logs)
        self.restart_seconds.append(time.monotonic() - started)
        return node

    # -- teardown -------------------------------------------------------------

    def close_clients(self) -> None:
        for cache in (self._clients, self._admins):
            for c in cache.values():
                c.close()
            cache.clear()

    def stop(self, keep_files: bool = False) -> None:
        """Kill every process this setup started (by pid), wait for them, remove their dirs."""
        self.close_clients()
        nodes = self.data_nodes + self.sentinels
        for n in nodes:
            if n.running() and n.process is not None:
                n.process.send_signal(signal.SIGCONT)  # a frozen node too
                n.process.kill()
        for n in nodes:
            if n.process is not None:
                n.process.wait(timeout=30)
        if not keep_files:
            for n in nodes:
                shutil.rmtree(n.workdir, ignore_errors=True)

    def __enter__(self) -> SentinelSetup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sentinel_setup(
    tmpdir: str | os.PathLike[str],
    replicas: int = 2,
    sentinels: int = 3,
    service: str = "kq",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    timeout: float = START_TIMEOUT,
    tls: TlsFiles | None = None,
) -> SentinelSetup:
    """Start 1 master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority)
    and return once every replica's link is up and every sentinel sees the master, all the
    replicas and the other sentinels. ``startup_seconds``/``startup_phases`` say how long.
    With ``tls`` (tests.helpers.make_certs' files) every port speaks TLS only (module docstring)."""
    server = redis_server_binary()
    if server is None:
        raise SentinelSetupError("redis-server is needed (apt-get install redis-server)")
    root = Path(tmpdir)
    root.mkdir(parents=True, exist_ok=True)
    setup = SentinelSetup(
        root,
        server,
        service,
        replicas,
        quorum=sentinels // 2 + 1,
        down_after_ms=down_after_ms,
        failover_timeout_ms=failover_timeout_ms,
        tls=tls,
    )
    try:
        setup._start(sentinels, time.monotonic() + timeout)
    except BaseException:
        # The logs stay on disk (their tails are in the error) for a look afterwards.
        setup.stop(keep_files=True)
        raise
    return setup


@dataclass
class SentinelFactory:
    """Starts private Sentinel setups under one directory and stops them all at the end."""

    root: Path
    setups: list[SentinelSetup] = field(default_factory=list)

    def __call__(self, **kwargs: Any) -> SentinelSetup:
        setup = start_sentinel_setup(self.root / f"sentinel-setup-{len(self.setups)}", **kwargs)
        self.setups.append(setup)
        return setup

    def stop_all(self) -> None:
        for setup in self.setups:
            setup.stop()
