"""A real Redis Cluster on loopback ports, for the test session and for bench/.

Pure redis-py plus the ``redis-server`` and ``redis-cli`` binaries; kickq is not imported.

    cluster = start_cluster(tmpdir)          # 3 masters + 3 replicas, converged
    ns = cluster.namespace_on(cluster.masters()[1], "kt")
    cluster.move_slot(cluster.slot_of(ns), cluster.masters()[2])
    promoted = cluster.kill_master(cluster.owner_of(ns))
    cluster.restart(old_master)              # rejoins as a replica of `promoted`
    cluster.stop()

``Cluster.attach(url)`` wraps an existing cluster instead (nothing is started; the
destructive helpers ``move_slot``/``begin_move``/``kill_master``/``restart`` call the
``refuse`` callback, which the test fixture sets to ``pytest.skip``).

Each node gets its own directory ``<tmpdir>/node-<port>/`` holding
``nodes-<port>.conf`` and ``redis.log``, and both its client port and its cluster bus
port are chosen free: the default bus port (port + 10000) does not exist for the upper
part of Linux' ephemeral range (32768-60999), so ``--cluster-port`` is always given.
``tests/helpers.start_redis`` is not used for the nodes because ``restart`` must bring a
node back on the same two ports with the same ``nodes.conf``; its ``free_port`` and
``ping`` are.

``start_cluster(tmpdir, tls=make_certs(dir))`` starts a cluster that speaks TLS only:
each node's one port is a TLS port (``--port 0 --tls-port``), the cluster bus and
replication run over TLS too, and ``Cluster.url`` is ``rediss+cluster://...``; clients
verify the nodes against ``tls["ca.crt"]`` and need no certificate of their own.

What Redis 7.0.15 (Debian package, this machine) replies while one slot is half
migrated: ``CLUSTER SETSLOT s IMPORTING <source>`` on the target, ``CLUSTER SETSLOT s
MIGRATING <target>`` on the source, and a MIGRATE of some of the slot's keys. Keys of
the slot: ``S`` still on the source, ``M`` already moved to the target, ``N`` on
neither. Asserted one by one by tests/test_topology.py (test_half_migrated_*), for EVAL
and for FCALL alike (a function loaded on both nodes; the same replies):

    ASK       -ASK <slot> <target host>:<port>
    MOVED     -MOVED <slot> <source host>:<port>
    TRYAGAIN  -TRYAGAIN Multiple keys request during rehashing of slot
    NONLOCAL  -ERR Script attempted to access a non local key in a cluster node script:
              <sha>, on @user_script:<line>.  (FCALL: <function>, on @user_function:<line>.)
              Raised by the redis.call() inside the script: what the script wrote
              before that call stays written.

    command (script: declared KEYS,    on the source   on the target   on the target
    then undeclared names from ARGV)                   (no ASKING)     after ASKING
    GET S                              S               MOVED           nil
    GET M                              ASK             MOVED           M
    GET N                              ASK             MOVED           nil
    SET N2 (creates a key)             ASK             MOVED           OK, on the target
    MGET S M                           TRYAGAIN        MOVED           TRYAGAIN
    script KEYS [S]                    runs: S         MOVED           runs: nil
    script KEYS [M]                    ASK             MOVED           runs: M
    script KEYS [N]                    ASK             MOVED           runs: nil
    script KEYS [S, M]                 TRYAGAIN        MOVED           TRYAGAIN
    script KEYS [S, N]                 TRYAGAIN        MOVED           TRYAGAIN
    script KEYS [M, N]                 ASK             MOVED           TRYAGAIN
    script KEYS [S], reads M           NONLOCAL        MOVED           runs: nil, M
    script KEYS [S], reads N           NONLOCAL        MOVED           runs: nil, nil
    script KEYS [M], reads S           ASK             MOVED           runs: M, nil
    script no KEYS, reads S            runs: S         NONLOCAL        runs: nil
    script no KEYS, reads M            NONLOCAL        NONLOCAL        runs: M
    script no KEYS, reads N            NONLOCAL        NONLOCAL        runs: nil

What a design can rely on: a script that declares every key it touches either runs
on the source with all of them present, or is refused before it runs: ASK when none
of them is on the source (all moved or never created), TRYAGAIN when some are. After
ASKING the target runs a one-key script whatever that key's state, and a multi-key
script only if all its keys are already there (TRYAGAIN otherwise). TRYAGAIN goes
away once the move finishes (the slot is then whole on the target). A key a script
touches without declaring it is the trap: on the source, a moved or absent one aborts
the script mid-way (NONLOCAL, after its earlier writes); on the target after ASKING,
one not yet moved reads as absent (nil), silently.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import log_tail, poll_until, free_port, ping, redis_server_binary

#: The files of a TLS cluster, as tests.helpers.make_certs() returns them: "ca.crt" (what
#: clients verify the nodes against), "server.crt" and "server.key" (every node's).
TlsFiles = Mapping[str, Path]

T = TypeVar("T")

HOST = "127.0.0.1"
SLOTS = 16384
# Override the redis-cli binary with KICKQ_REDIS_CLI=/path/to/redis-cli.
REDIS_CLI_ENV = "KICKQ_REDIS_CLI"
# Everything start_cluster does must fit in this (a loaded 2-core machine takes a few
# seconds; the margin is for a machine busy with other test sessions).
START_TIMEOUT = 60.0
POLL_INTERVAL = 0.05
MIGRATE_TIMEOUT_MS = 5000


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for in time (message has log tails)."""


class ClusterNotOwned(RuntimeError):
    """A destructive helper was called on a cluster this harness did not start."""


def _refuse_by_raising(reason: str) -> NoReturn:
    raise ClusterNotOwned(reason)


def redis_cli_binary() -> str | None:
    """Path of redis-cli: $KICKQ_REDIS_CLI, PATH, or next to the redis-server in use."""
    explicit = os.environ.get(REDIS_CLI_ENV)
    if explicit:
        return explicit
    found = shutil.which("redis-cli")
    if found:
        return found
    server = redis_server_binary()
    if server:
        sibling = Path(server).with_name("redis-cli")
        if sibling.exists():
            return str(sibling)
    return None


def error_text(exc: BaseException) -> str:
    """A Redis error reply as Redis wrote it, e.g. ``"ASK 1234 127.0.0.1:7001"``.

    redis-py 5.0.1 gives a plain client's -ASK/-MOVED/-TRYAGAIN as a ResponseError with
    the code in its message; 8.2 raises AskError/MovedError/TryAgainError with the code
    stripped. This puts the code back so tests compare the same text on every version.
    """
    from redis import exceptions as rex

    text = str(exc)
    codes: list[tuple[type[BaseException], str]] = [
        (rex.MovedError, "MOVED"),  # before AskError: MovedError subclasses it
        (rex.AskError, "ASK"),
        (rex.TryAgainError, "TRYAGAIN"),
        (rex.ClusterDownError, "CLUSTERDOWN"),
        (rex.ClusterCrossSlotError, "CROSSSLOT"),
        (rex.MasterDownError, "MASTERDOWN"),
    ]
    for cls, code in codes:
        if isinstance(exc, cls):
            return text if text.startswith(code + " ") or text == code else f"{code} {text}"
    return text


# ---------------------------------------------------------------------------
# Parsed replies


@dataclass(frozen=True)
class SlotRange:
    """One entry of CLUSTER SLOTS, reduced to node ids (comparable between nodes)."""

    start: int
    end: int
    master_id: str
    replica_ids: tuple[str, ...]

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot <= self.end


@dataclass(frozen=True)
class NodeLine:
    """One line of CLUSTER NODES."""

    node_id: str
    host: str
    port: int
    bus_port: int
    flags: frozenset[str]
    master_id: str | None
    link_state: str
    slots: tuple[tuple[int, int], ...]
    migrating: dict[int, str]  # slot -> target id (only on the "myself" line)
    importing: dict[int, str]  # slot -> source id (only on the "myself" line)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


_ADDR = re.compile(r"^(?P<host>[^:@,]*(?:\[[^\]]*\])?):(?P<port>\d+)(?:@(?P<bus>\d+))?")


def parse_cluster_nodes(text: str) -> list[NodeLine]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        m = _ADDR.match(parts[1])
        if m is None:
            continue
        slots: list[tuple[int, int]] = []
        migrating: dict[int, str] = {}
        importing: dict[int, str] = {}
        for item in parts[8:]:
            if item.startswith("["):
                body = item[1:-1]
                if "->-" in body:
                    s, other = body.split("->-")
                    migrating[int(s)] = other
                elif "-<-" in body:
                    s, other = body.split("-<-")
                    importing[int(s)] = other
            elif "-" in item:
                a, b = item.split("-")
                slots.append((int(a), int(b)))
            else:
                slots.append((int(item), int(item)))
        out.append(
            NodeLine(
                node_id=parts[0],
                host=m.group("host") or HOST,
                port=int(m.group("port")),
                bus_port=int(m.group("bus") or 0),
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                link_state=parts[7],
                slots=tuple(slots),
                migrating=migrating,
                importing=importing,
            )
        )
    return out


def parse_cluster_slots(reply: Sequence[Any]) -> tuple[SlotRange, ...]:
    ranges = []
    for entry in reply:
        start, end, master, *replicas = entry
        ranges.append(
            SlotRange(
                start=int(start),
                end=int(end),
                master_id=str(master[2]),
                replica_ids=tuple(sorted(str(r[2]) for r in replicas)),
            )
        )
    return tuple(sorted(ranges, key=lambda r: r.start))


def parse_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


_URL = re.compile(r"^(?P<scheme>[a-z+]+)://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?(?P<hosts>[^/?]+)")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``redis+cluster://[user:pass@]h1:p1,h2:p2`` (or ``redis://h:p``) -> (startup, user, password)."""
    m = _URL.match(url)
    if m is None or m.group("scheme") not in ("redis+cluster", "redis"):
        raise ValueError(f"not a redis+cluster:// URL: {url!r}")
    startup = []
    for item in m.group("hosts").split(","):
        host, _, port = item.rpartition(":")
        startup.append((host or HOST, int(port) if port else 6379))
    return startup, m.group("user") or None, m.group("password") or None


# ---------------------------------------------------------------------------
# Nodes


@dataclass(eq=False)
class ClusterNode:
    """One redis-server of the cluster. ``role``/``master_id`` are as of the last refresh."""

    host: str
    port: int
    node_id: str = ""
    role: str = ""  # "master" or "replica"
    master_id: str | None = None
    process: subprocess.Popen | None = None
    bus_port: int = 0
    workdir: Path | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def logfile(self) -> Path | None:
        return self.workdir / "redis.log" if self.workdir else None

    @property
    def conf(self) -> Path | None:
        return self.workdir / f"nodes-{self.port}.conf" if self.workdir else None

    def running(self) -> bool:
        """False only for a process this harness started and that has exited."""
        return self.process is None or self.process.poll() is None

    def __repr__(self) -> str:
        return f"<ClusterNode {self.host}:{self.port} {self.role or '?'} {self.node_id[:8]}>"


@dataclass
class Failover:
    """What kill_master measured: from SIGKILL to the replica serving the slots."""

    killed: ClusterNode
    promoted: ClusterNode
    promotion_seconds: float  # replica says master and every survivor's CLUSTER SLOTS names it
    cluster_ok_seconds: float  # ... and every survivor says cluster_state:ok


def _tls_options(tls: TlsFiles | None) -> dict[str, Any]:
    """redis-py options of a client of a node (none for a plain cluster)."""
    return {"ssl": True, "ssl_ca_certs": str(tls["ca.crt"])} if tls else {}


def _answers(node: ClusterNode, tls: TlsFiles | None) -> bool:
    return ping(node.host, node.port, tls_ca=tls["ca.crt"] if tls else None)


def _admin_client(
    host: str, port: int, username: str | None, password: str | None, tls: TlsFiles | None = None
) -> redis.Redis:
    # No retries: a poll against a node that was just killed must fail at once, not
    # after redis-py's reconnect backoff.
    return redis.Redis(
        host=host,
        port=port,
        username=username,
        password=password,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
        **_tls_options(tls),
    )


def _poll(
    predicate: Callable[[], T | None], timeout: float, what: str, details: Callable[[], str]
) -> T:
    """Call ``predicate`` until it returns something truthy; a RedisError counts as not yet."""
    return poll_until(predicate, timeout, what, details, error=ClusterError, interval=POLL_INTERVAL)


# ---------------------------------------------------------------------------
# Cluster


class Cluster:
    """A running Redis Cluster: started by start_cluster(), or attached with Cluster.attach()."""

    def __init__(
        self,
        nodes: list[ClusterNode],
        *,
        owned: bool,
        url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        node_timeout_ms: int = 2000,
        refuse: Callable[[str], NoReturn] = _refuse_by_raising,
        redis_server: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.nodes = nodes
        self.tls = tls
        self.owned = owned
        self.node_timeout_ms = node_timeout_ms
        self.refuse = refuse
        self.username = username
        self.password = password
        self.startup_seconds: float | None = None
        self.startup_phases: dict[str, float] = {}
        self.failovers: list[Failover] = []
        self._redis_server = redis_server
        # The shape a healthy cluster has (None: not checked, for an attached cluster).
        self.expected_masters: int | None = None
        self.expected_replicas: int | None = None
        self._clients: dict[int, redis.Redis] = {}
        self._admins: dict[int, redis.Redis] = {}
        self.startup: list[tuple[str, int]] = []
        self.url = url or ""

    # -- construction -------------------------------------------------------

    @classmethod
    def attach(cls, url: str, refuse: Callable[[str], NoReturn] = _refuse_by_raising) -> Cluster:
        """Wrap an existing cluster (nothing is started; destructive helpers call ``refuse``)."""
        startup, username, password = parse_cluster_url(url)
        view: list[NodeLine] | None = None
        errors = []
        for host, port in startup:
            admin = _admin_client(host, port, username, password)
            try:
                view = parse_cluster_nodes(admin.execute_command("CLUSTER", "NODES"))
                break
            except redis.RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
            finally:
                admin.close()
        if view is None:
            raise ClusterError(f"no startup node of {url} answered CLUSTER NODES: {errors}")
        nodes = [
            ClusterNode(
                host=line.host,
                port=line.port,
                node_id=line.node_id,
                role="master" if line.is_master else "replica",
                master_id=line.master_id,
                bus_port=line.bus_port,
            )
            for line in sorted(view, key=lambda n: n.port)
            if not line.failing
        ]
        cluster = cls(nodes, owned=False, url=url, username=username, password=password, refuse=refuse)
        cluster.startup = startup
        return cluster

    def _set_url(self) -> None:
        # Fixed for the cluster's life: a client needs just one startup node that answers,
        # master or not, so a later failover or a killed node does not make it stale.
        first_two = self.masters()[:2] if self.nodes else []
        self.startup = [m.addr for m in first_two]
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        self.url = f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in self.startup)

    # -- clients ------------------------------------------------------------

    def node(self, key: int | str | ClusterNode) -> ClusterNode:
        """The node with this port or node id."""
        if isinstance(key, ClusterNode):
            return key
        for n in self.nodes:
            if n.port == key or n.node_id == key:
                return n
        raise KeyError(f"no node {key!r} in {self.nodes}")

    def client(self, node: int | ClusterNode) -> redis.Redis:
        """A plain ``redis.Redis(decode_responses=True)`` on one node (cached; stop() closes it)."""
        n = self.node(node)
        if n.port not in self._clients:
            self._clients[n.port] = redis.Redis(
                host=n.host,
                port=n.port,
                username=self.username,
                password=self.password,
                decode_responses=True,
                **_tls_options(self.tls),
            )
        return self._clients[n.port]

    def admin(self, node: int | ClusterNode) -> redis.Redis:
        """The harness' own client on one node: no retries, long socket timeout (for MIGRATE)."""
        n = self.node(node)
        if n.port not in self._admins:
            self._admins[n.port] = _admin_client(n.host, n.port, self.username, self.password, self.tls)
        return self._admins[n.port]

    def running_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.running()]

    def _any_admin(self) -> redis.Redis:
        errors = []
        for n in self.running_nodes():
            admin = self.admin(n)
            try:
                admin.ping()
                return admin
            except redis.RedisError as exc:
                errors.append(f"{n}: {exc}")
        raise ClusterError(f"no node of the cluster answers: {errors}")

    # -- views --------------------------------------------------------------

    def cluster_nodes(self, node: int | ClusterNode | None = None) -> list[NodeLine]:
        """CLUSTER NODES as one node (default: any running node) sees it."""
        admin = self.admin(node) if node is not None else self._any_admin()
        return parse_cluster_nodes(admin.execute_command("CLUSTER", "NODES"))

    def slot_map(self, node: int | ClusterNode | None = None) -> tuple[SlotRange, ...]:
        """CLUSTER SLOTS as one node (default: any running node) sees it."""
        admin = self.admin(node) if node is not None else self._any_admin()
        return parse_cluster_slots(admin.execute_command("CLUSTER", "SLOTS"))

    def cluster_info(self, node: int | ClusterNode) -> dict[str, str]:
        return parse_info(self.admin(node).execute_command("CLUSTER", "INFO"))

    def refresh(self) -> None:
        """Update every node's role and master_id from a running node's CLUSTER NODES."""
        by_id = {line.node_id: line for line in self.cluster_nodes()}
        for n in self.nodes:
            line = by_id.get(n.node_id)
            if line is not None:
                n.role = "failed" if line.failing else "master" if line.is_master else "replica"
                n.master_id = line.master_id

    def masters(self) -> list[ClusterNode]:
        """The nodes that own slots now, ordered by their lowest slot."""
        seen: list[ClusterNode] = []
        for r in self.slot_map():
            n = self.node(r.master_id)
            if n not in seen:
                seen.append(n)
        return seen

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """The healthy replicas of ``master`` (as the master, or any running node, sees them)."""
        source = master if master.running() else None
        lines = self.cluster_nodes(source)
        return [
            self.node(line.node_id)
            for line in sorted(lines, key=lambda n: n.port)
            if not line.is_master and line.master_id == master.node_id and not line.failing
        ]

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        replicas = self.replicas_of(master)
        if not replicas:
            raise ClusterError(f"{master} has no healthy replica")
        return replicas[0]

    def slots_of(self, master: ClusterNode) -> list[tuple[int, int]]:
        return [(r.start, r.end) for r in self.slot_map() if r.master_id == master.node_id]

    def slot_of(self, namespace: str) -> int:
        """The slot of every key ``{namespace}:...`` (CLUSTER KEYSLOT "{namespace}")."""
        return int(self._any_admin().execute_command("CLUSTER", "KEYSLOT", "{" + namespace + "}"))

    def owner_of_slot(self, slot: int) -> ClusterNode:
        for r in self.slot_map():
            if slot in r:
                return self.node(r.master_id)
        raise ClusterError(f"slot {slot} has no owner")

    def owner_of(self, namespace: str) -> ClusterNode:
        """The master that holds the namespace's slot now."""
        return self.owner_of_slot(self.slot_of(namespace))

    def namespace_on(self, node: ClusterNode, prefix: str = "kt") -> str:
        """A fresh namespace ``<prefix>-<hex>`` whose slot the master ``node`` holds."""
        ranges = self.slots_of(node)
        if not ranges:
            raise ValueError(f"{node} holds no slots")
        admin = self._any_admin()
        for _ in range(100_000):
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            slot = int(admin.execute_command("CLUSTER", "KEYSLOT", "{" + name + "}"))
            if any(a <= slot <= b for a, b in ranges):
                return name
        raise ClusterError(f"no namespace found on {node} (ranges {ranges})")

    # -- health -------------------------------------------------------------

    def health_problem(self, nodes: Iterable[ClusterNode] | None = None) -> str | None:
        """None when every node (default: all) is up, says cluster_state:ok, knows every node
        as healthy, has its replication link up (replicas) and all agree on CLUSTER SLOTS."""
        nodes = list(self.nodes if nodes is None else nodes)
        expected_ids = {n.node_id for n in nodes}
        maps: dict[tuple[SlotRange, ...], list[ClusterNode]] = {}
        for n in nodes:
            if not n.running():
                return f"{n} is not running"
            try:
                info = self.cluster_info(n)
                if info.get("cluster_state") != "ok":
                    return f"{n}: cluster_state:{info.get('cluster_state')}"
                if info.get("cluster_slots_assigned") != str(SLOTS):
                    return f"{n}: cluster_slots_assigned:{info.get('cluster_slots_assigned')}"
                lines = self.cluster_nodes(n)
                healthy = {line.node_id for line in lines if not line.failing}
                if not expected_ids <= healthy:
                    return f"{n}: does not see as healthy: {sorted(expected_ids - healthy)}"
                mine = next(line for line in lines if "myself" in line.flags)
                if mine.migrating or mine.importing:
                    return f"{n}: slot migration in progress {mine.migrating or mine.importing}"
                if not mine.is_master:
                    repl = self.admin(n).info("replication")
                    if repl.get("master_link_status") != "up":
                        return f"{n}: master_link_status:{repl.get('master_link_status')}"
                maps.setdefault(self.slot_map(n), []).append(n)
            except redis.RedisError as exc:
                return f"{n}: {type(exc).__name__}: {exc}"
        if len(maps) > 1:
            return "nodes disagree on CLUSTER SLOTS: " + "; ".join(
                f"{ns}: {[(r.start, r.end, r.master_id[:8], [x[:8] for x in r.replica_ids]) for r in m]}"
                for m, ns in maps.items()
            )
        if maps:
            agreed = next(iter(maps))
            owners = {r.master_id for r in agreed}
            if self.expected_masters is not None and len(owners) != self.expected_masters:
                return f"{len(owners)} masters own slots, not {self.expected_masters}"
            if self.expected_replicas is not None and any(
                len(r.replica_ids) != self.expected_replicas for r in agreed
            ):
                return f"not every slot range has {self.expected_replicas} replica(s) yet: {agreed}"
        return None

    def wait_healthy(
        self, timeout: float = START_TIMEOUT, nodes: Iterable[ClusterNode] | None = None
    ) -> None:
        nodes = list(self.nodes if nodes is None else nodes)
        problem: list[str | None] = [None]

        def healthy() -> bool:
            problem[0] = self.health_problem(nodes)
            return problem[0] is None

        _poll(
            healthy,
            timeout,
            "the cluster is healthy",
            lambda: f"last problem: {problem[0]}\n" + self.logs(),
        )
        self.refresh()

    def logs(self, lines: int = 15) -> str:
        """The last lines of every node's log (for error messages)."""
        return "\n".join(
            f"--- {n} ({'running' if n.running() else 'exited'}) {n.logfile}:\n{log_tail(n.logfile, lines)}"
            for n in self.nodes
            if n.workdir is not None
        )

    # -- slot moves ---------------------------------------------------------

    def begin_move(
        self, slot: int, target: ClusterNode, migrate_timeout_ms: int = MIGRATE_TIMEOUT_MS
    ) -> SlotMove:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner; move no key yet.

        Use the returned SlotMove to migrate keys (all, a batch, or chosen ones) and to
        finish; as a context manager it finishes the move on exit whatever happened.
        """
        if not self.owned:
            self.refuse("moves a slot: the cluster is not this session's own (KICKQ_TEST_CLUSTER_URL)")
        move = SlotMove(self, slot, self.owner_of_slot(slot), target, migrate_timeout_ms)
        move.begin()
        return move

    def move_slot(
        self,
        slot: int,
        target: ClusterNode,
        batch: int = 10,
        pause: float = 0.0,
        on_step: Callable[[SlotMove, list[str]], None] | None = None,
    ) -> SlotMove:
        """Move one slot with its keys to ``target``, as ``redis-cli --cluster reshard`` does.

        ``pause`` seconds pass between MIGRATE batches (a test's window in which the slot's
        keys are split between two nodes); ``on_step(move, keys)`` runs after each batch.
        Returns when every node names ``target`` as the slot's owner.
        """
        move = self.begin_move(slot, target)
        move.finish(batch=batch, pause=pause, on_step=on_step)
        return move

    # -- failures -----------------------------------------------------------

    def kill_master(self, master: ClusterNode, timeout: float | None = None) -> ClusterNode:
        """SIGKILL ``master``; return its replica once that serves the master's slots.

        Waits until the replica says role master, every surviving node's CLUSTER SLOTS names
        it for those slots and says cluster_state:ok; the times are appended to ``failovers``.
        Seen here: a master killed while one of its slots is half migrated leaves the
        importing node naming the dead node as that slot's owner (Redis does not update a
        slot it is importing), so that node stays at cluster_state:fail and this times out.
        """
        if not self.owned:
            self.refuse("kills a master: the cluster is not this session's own (KICKQ_TEST_CLUSTER_URL)")
        if master.process is None or not master.running():
            raise ClusterError(f"{master} is not a running process of this cluster")
        ranges = self.slots_of(master)
        if not ranges:
            raise ClusterError(f"{master} holds no slots (not a master?)")
        candidates = self.replicas_of(master)
        if not candidates:
            raise ClusterError(f"{master} has no healthy replica to promote")
        timeout = timeout if timeout is not None else 30.0 + 5 * self.node_timeout_ms / 1000
        survivors = [n for n in self.nodes if n is not master and n.running()]
        first_slot = ranges[0][0]
        candidate_ids = {c.node_id for c in candidates}

        started = time.monotonic()
        master.process.send_signal(signal.SIGKILL)
        master.process.wait(timeout=30)

        def promoted() -> ClusterNode | None:
            owners = set()
            for n in survivors:
                owners.add(next(r.master_id for r in self.slot_map(n) if first_slot in r))
            if len(owners) != 1:
                return None
            owner_id = owners.pop()
            if owner_id not in candidate_ids:
                return None
            owner = self.node(owner_id)
            role = self.admin(owner).execute_command("ROLE")
            return owner if role[0] == "master" else None

        new_master = _poll(
            promoted, timeout, f"a replica of {master} is promoted", lambda: self.logs()
        )
        promotion_seconds = time.monotonic() - started
        _poll(
            lambda: all(self.cluster_info(n).get("cluster_state") == "ok" for n in survivors),
            timeout,
            "the surviving nodes say cluster_state:ok",
            lambda: self.logs(),
        )
        self.failovers.append(
            Failover(master, new_master, promotion_seconds, time.monotonic() - started)
        )
        self.refresh()
        return new_master

    def restart(self, node: ClusterNode, timeout: float = START_TIMEOUT) -> ClusterNode:
        """Start a stopped node again on its ports with its nodes.conf; wait until it has
        rejoined (a killed master whose slots went to its replica comes back as that
        replica's replica) and the whole cluster is healthy."""
        if not self.owned or self._redis_server is None or node.workdir is None:
            self.refuse("restarts a node: the cluster is not this session's own (KICKQ_TEST_CLUSTER_URL)")
        if node.running():
            raise ClusterError(f"{node} is still running")
        node.process = _spawn(self._redis_server, node, self.node_timeout_ms, self.tls)
        _poll(
            lambda: node.running() and _answers(node, self.tls),
            timeout,
            f"{node} answers PING again",
            lambda: f"exit code {node.process.poll() if node.process else None}\n{log_tail(node.logfile)}",
        )
        # A node that restarts with the same id keeps its old client connections cached
        # on our side: drop them so the next command reconnects.
        for cache in (self._clients, self._admins):
            stale = cache.pop(node.port, None)
            if stale is not None:
                stale.close()
        self.wait_healthy(timeout)
        return node

    # -- teardown -----------------------------------------------------------

    def close_clients(self) -> None:
        for cache in (self._clients, self._admins):
            for c in cache.values():
                c.close()
            cache.clear()

    def stop(self, keep_files: bool = False) -> None:
        """Kill every process this harness started, wait for them, remove their directories."""
        self.close_clients()
        for n in self.nodes:
            if n.process is not None and n.process.poll() is None:
                n.process.kill()
        for n in self.nodes:
            if n.process is not None:
                n.process.wait(timeout=30)
        if self.owned and not keep_files:
            for n in self.nodes:
                if n.workdir is not None:
                    shutil.rmtree(n.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SlotMove:
    """One slot being moved from ``source`` to ``target``, step by step.

    ``begin()`` (done by Cluster.begin_move) marks the slot IMPORTING/MIGRATING;
    ``migrate_keys``/``migrate_batch``/``migrate_all`` MIGRATE keys; ``finish()`` moves
    what is left and gives the slot to the target on every master. Between begin and
    finish the slot is half migrated: clients meet ASK and TRYAGAIN (module docstring).
    """

    def __init__(
        self, cluster: Cluster, slot: int, source: ClusterNode, target: ClusterNode, migrate_timeout_ms: int
    ) -> None:
        if source is target:
            raise ValueError(f"slot {slot} is already on {target}")
        self.cluster = cluster
        self.slot = slot
        self.source = source
        self.target = target
        self.migrate_timeout_ms = migrate_timeout_ms
        self.moved_keys = 0
        self.batches = 0
        self.begun = False
        self.finished = False

    def begin(self) -> None:
        setslot = ("CLUSTER", "SETSLOT", self.slot)
        self.cluster.admin(self.target).execute_command(*setslot, "IMPORTING", self.source.node_id)
        self.cluster.admin(self.source).execute_command(*setslot, "MIGRATING", self.target.node_id)
        self.begun = True

    def keys_on_source(self, count: int = 100) -> list[str]:
        admin = self.cluster.admin(self.source)
        return list(admin.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, count))

    def count_on(self, node: ClusterNode) -> int:
        return int(self.cluster.admin(node).execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot))

    def migrate_keys(self, keys: Sequence[str]) -> None:
        """MIGRATE exactly these keys (absent ones are skipped by Redis: reply NOKEY)."""
        if not keys:
            return
        self.cluster.admin(self.source).execute_command(
            "MIGRATE", self.target.host, self.target.port, "", 0, self.migrate_timeout_ms, "KEYS", *keys
        )
        self.moved_keys += len(keys)
        self.batches += 1

    def migrate_batch(self, batch: int = 10) -> list[str]:
        """Move up to ``batch`` of the keys still on the source; return them ([] when none left)."""
        keys = self.keys_on_source(batch)
        self.migrate_keys(keys)
        return keys

    def migrate_all(
        self,
        batch: int = 10,
        pause: float = 0.0,
        on_step: Callable[[SlotMove, list[str]], None] | None = None,
    ) -> None:
        """Move batches until GETKEYSINSLOT on the source returns nothing (keys written
        meanwhile are taken by a later batch)."""
        while True:
            keys = self.migrate_batch(batch)
            if not keys:
                return
            if on_step is not None:
                on_step(self, keys)
            if pause > 0:
                # Pacing, not waiting for a result: it stretches the window in which the
                # slot's keys are split, for tests that act inside it.
                time.sleep(pause)

    def finish(
        self,
        batch: int = 10,
        pause: float = 0.0,
        on_step: Callable[[SlotMove, list[str]], None] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        """Move the remaining keys, then CLUSTER SETSLOT NODE on the target, the source and
        every other master; return when every running node names the target as owner."""
        if self.finished:
            return
        c = self.cluster
        self.migrate_all(batch, pause, on_step)
        target_id = self.target.node_id
        c.admin(self.target).execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                c.admin(self.source).execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
                break
            except redis.ResponseError as exc:
                # A key reached the source after its last empty GETKEYSINSLOT.
                if "still hold keys" not in str(exc) or time.monotonic() > deadline:
                    raise
                self.migrate_all(batch, 0.0, on_step)
        for m in c.masters():
            if m is not self.target and m is not self.source and m.running():
                c.admin(m).execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)

        def everyone_agrees() -> bool:
            for n in c.running_nodes():
                owner = next(r.master_id for r in c.slot_map(n) if self.slot in r)
                if owner != target_id:
                    return False
                mine = next(line for line in c.cluster_nodes(n) if "myself" in line.flags)
                if self.slot in mine.migrating or self.slot in mine.importing:
                    return False
            return True

        _poll(
            everyone_agrees,
            max(0.0, deadline - time.monotonic()) + 1.0,
            f"every node names {self.target} the owner of slot {self.slot}",
            lambda: c.logs(),
        )
        self.finished = True

    def __enter__(self) -> SlotMove:
        return self

    def __exit__(self, *exc: object) -> None:
        # Whatever the test did, leave the slot whole on one node for the tests after it.
        if self.begun and not self.finished:
            self.finish()


# ---------------------------------------------------------------------------
# Starting


def _spawn(binary: str, node: ClusterNode, node_timeout_ms: int, tls: TlsFiles | None) -> subprocess.Popen:
    assert node.workdir is not None
    node.workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(node.conf),
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-port", str(node.bus_port),
        "--bind", node.host,
        *_port_args(node.port, tls),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(node.workdir),
        "--daemonize", "no",
        # A replica's first sync starts at once instead of after Redis' default 5 s
        # (which waits for more replicas to share one diskless transfer).
        "--repl-diskless-sync-delay", "0",
        # CLUSTER SLOTS lists a replica only once its replication offset is not 0; on an
        # idle master the offset moves with the master's pings to its replicas, every
        # 10 s by default, which would hold start_cluster for up to 10 s.
        "--repl-ping-replica-period", "1",
    ]
    with open(node.workdir / "redis.log", "ab") as log:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=node.workdir
        )


def _port_args(port: int, tls: TlsFiles | None) -> list[str]:
    """The node's client port: plain, or (``tls``) a TLS port with no plain one. With TLS the
    cluster bus and replication use it too; the nodes' certificate is also their client
    certificate on the bus, where Redis always asks for one; clients need none."""
    if not tls:
        return ["--port", str(port)]
    return [
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(tls["server.crt"]),
        "--tls-key-file", str(tls["server.key"]),
        "--tls-ca-cert-file", str(tls["ca.crt"]),
        "--tls-auth-clients", "no",
        "--tls-cluster", "yes",
        "--tls-replication", "yes",
    ]


def _launch_nodes(
    binary: str,
    root: Path,
    count: int,
    node_timeout_ms: int,
    deadline: float,
    attempts: int = 5,
    tls: TlsFiles | None = None,
) -> list[ClusterNode]:
    """Start ``count`` nodes at once on fresh port pairs; start again any that could not bind."""
    ready: list[ClusterNode] = []
    taken: set[int] = set()
    failures: list[str] = []

    def fresh_port() -> int:
        while True:
            port = free_port(HOST)
            if port not in taken:
                taken.add(port)
                return port

    for _ in range(attempts):
        batch = []
        for _ in range(count - len(ready)):
            port = fresh_port()
            node = ClusterNode(host=HOST, port=port, bus_port=fresh_port(), workdir=root / f"node-{port}")
            node.process = _spawn(binary, node, node_timeout_ms, tls)
            batch.append(node)
        for node in batch:
            assert node.process is not None
            while time.monotonic() < deadline and node.process.poll() is None:
                if _answers(node, tls):
                    break
                time.sleep(0.01)
            if node.process.poll() is None and _answers(node, tls):
                ready.append(node)
                continue
            # Exited (most likely a port taken between choosing and binding) or too slow.
            if node.process.poll() is None:
                node.process.kill()
            node.process.wait(timeout=30)
            failures.append(f"{node}: exit code {node.process.returncode}\n{log_tail(node.logfile, 5)}")
            if node.workdir is not None:
                shutil.rmtree(node.workdir, ignore_errors=True)
        if len(ready) == count:
            return ready
        if time.monotonic() >= deadline:
            break
    for node in ready:
        assert node.process is not None
        node.process.kill()
        node.process.wait(timeout=30)
    raise ClusterError(f"could not start {count} cluster nodes:\n" + "\n".join(failures))


def start_cluster(
    tmpdir: str | os.PathLike[str],
    masters: int = 3,
    replicas_per_master: int = 1,
    node_timeout_ms: int = 2000,
    timeout: float = START_TIMEOUT,
    refuse: Callable[[str], NoReturn] = _refuse_by_raising,
    tls: TlsFiles | None = None,
) -> Cluster:
    """Start masters*(1+replicas_per_master) nodes, create the cluster with redis-cli and
    return once every node says cluster_state:ok, every replica's link is up and all
    nodes agree on CLUSTER SLOTS. ``startup_seconds``/``startup_phases`` say how long it took.
    With ``tls`` (tests.helpers.make_certs' files) the nodes speak TLS only (module docstring)."""
    if masters < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 masters")
    server = redis_server_binary()
    cli = redis_cli_binary()
    if server is None or cli is None:
        raise ClusterError("redis-server and redis-cli are needed (apt-get install redis-server)")
    root = Path(tmpdir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + timeout
    phases: dict[str, float] = {}

    nodes = _launch_nodes(
        server, root, masters * (1 + replicas_per_master), node_timeout_ms, deadline, tls=tls
    )
    cluster = Cluster(
        nodes, owned=True, node_timeout_ms=node_timeout_ms, refuse=refuse, redis_server=server, tls=tls
    )
    cluster.expected_masters = masters
    cluster.expected_replicas = replicas_per_master
    try:
        for n in nodes:
            n.node_id = str(cluster.admin(n).execute_command("CLUSTER", "MYID"))
        phases["processes"] = time.monotonic() - started

        t = time.monotonic()
        create = [
            cli, *(["--tls", "--cacert", str(tls["ca.crt"])] if tls else []),
            "--cluster", "create", *(f"{n.host}:{n.port}" for n in nodes),
            "--cluster-replicas", str(replicas_per_master), "--cluster-yes",
        ]
        try:
            result = subprocess.run(
                create, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired as exc:
            output = [
                o.decode(errors="replace") if isinstance(o, bytes) else o for o in (exc.stdout, exc.stderr)
            ]
            raise ClusterError(
                f"redis-cli --cluster create timed out; output:\n{output[0]}\n{output[1]}\n{cluster.logs()}"
            ) from exc
        if result.returncode != 0:
            raise ClusterError(
                f"redis-cli --cluster create exited {result.returncode}:\n{result.stdout}\n{result.stderr}\n"
                + cluster.logs()
            )
        phases["create"] = time.monotonic() - t

        t = time.monotonic()
        cluster.wait_healthy(max(1.0, deadline - time.monotonic()))
        found = cluster.masters()
        if len(found) != masters or any(len(cluster.replicas_of(m)) != replicas_per_master for m in found):
            raise ClusterError(f"unexpected topology: masters {found}, nodes {nodes}")
        cluster._set_url()
        phases["converge"] = time.monotonic() - t
    except BaseException:
        # The logs stay on disk (their tails are in the error) for a look afterwards.
        cluster.stop(keep_files=True)
        raise
    cluster.startup_phases = phases
    cluster.startup_seconds = time.monotonic() - started
    return cluster


@dataclass
class ClusterFactory:
    """Starts private clusters under one directory and stops them all at the end."""

    root: Path
    refuse: Callable[[str], NoReturn] = _refuse_by_raising
    clusters: list[Cluster] = field(default_factory=list)

    def __call__(
        self,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = 2000,
        tls: TlsFiles | None = None,
    ) -> Cluster:
        cluster = start_cluster(
            self.root / f"cluster-{len(self.clusters)}",
            masters=masters,
            replicas_per_master=replicas_per_master,
            node_timeout_ms=node_timeout_ms,
            refuse=self.refuse,
            tls=tls,
        )
        self.clusters.append(cluster)
        return cluster

    def stop_all(self) -> None:
        for cluster in self.clusters:
            cluster.stop()
