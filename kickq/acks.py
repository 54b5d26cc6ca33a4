"""Writes that replicas confirm: with `wait_replicas` N > 0, a write returns once N replicas have it.

Redis WAIT N (WAITAOF 1 N with `wait_aof`) counts the replicas that hold the replication offset
its connection had after that connection's last write: it proves something only on the connection
that made the write, right after it. So a write and its WAIT go in one pipeline, on one connection:
the script call (several in a MULTI), then WAIT (`commands`). One WAIT per call or batch, never
one per job.

The commands and the reading of their replies are here, for the sync client (`run`), kickq.aio
(`AsyncScripts.run_acked`) and the supervisor (its worker's Channel, its Ghoster). With
wait_replicas 0 and wait_aof off (the defaults) none of this runs: the plain calls are made as they are.

A shortfall raises ReplicationTimeout: the write is on the master, and is not confirmed.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import scripts
from .connection import parse_version
from .errors import ConfigError, ReplicationTimeout
from .keys import Keys

log = logging.getLogger("kickq.acks")

#: WAITAOF came with Redis 7.2.
WAITAOF_VERSION = (7, 2, 0)

#: A script call: (script name, (keys, args)).
Call = tuple[str, tuple[list[str], list[Any]]]


class Acks(NamedTuple):
    """What each write waits for: `replicas` confirmations within `timeout` seconds; with `aof`,
    fsyncs to the AOF (the master's own and the replicas')."""
    replicas: int
    timeout: float
    aof: bool

    def command(self) -> tuple[Any, ...]:
        """WAIT numreplicas timeout_ms, or WAITAOF numlocal numreplicas timeout_ms."""
        timeout_ms = max(1, int(round(self.timeout * 1000)))
        if self.aof:
            return ("WAITAOF", 1, self.replicas, timeout_ms)
        return ("WAIT", self.replicas, timeout_ms)


def wanted(settings: Mapping[str, Any]) -> Acks | None:
    """The Acks the settings ask for; None with wait_replicas 0 and wait_aof off (wait_aof alone
    waits for the master's own fsync: WAITAOF 1 0). ConfigError when the wait could outlast the
    reply timeout (the socket would time out first, and the reply be lost)."""
    replicas = int(settings["wait_replicas"])
    if not replicas and not settings["wait_aof"]:
        return None
    timeout = float(settings["wait_replicas_timeout"])
    if timeout >= float(settings["redis_timeout"]):
        raise ConfigError(f"wait_replicas_timeout ({timeout:g}s) must be below redis_timeout "
                          f"({float(settings['redis_timeout']):g}s), the longest wait for a reply: "
                          "the WAIT's reply would come too late")
    return Acks(replicas, timeout, bool(settings["wait_aof"]))


def check_server(acks: Acks, info: Mapping[str, Any], where: str) -> None:
    """ConfigError, before anything is written, when the server (as its INFO said when the client
    connected) cannot confirm `acks`: WAITAOF needs Redis 7.2 and appendonly on."""
    if not acks.aof:
        return
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < WAITAOF_VERSION:
        raise ConfigError(f"wait_aof needs Redis >= {'.'.join(map(str, WAITAOF_VERSION[:2]))} (WAITAOF); "
                          f"Redis at {where} is {version}: set wait_aof=False (WAIT: the replicas "
                          "have the write in memory)")
    if str(info.get("aof_enabled", "")) == "0":
        raise ConfigError(f"wait_aof needs appendonly on; Redis at {where} had it off when this client "
                          "connected: turn it on (CONFIG SET appendonly yes) and reconnect (close() the "
                          "client), or set wait_aof=False")


def commands(calls: Sequence[Call], acks: Acks, functions: bool | None,
             retry: bool = False) -> list[tuple[Any, ...]]:
    """The pipeline of a write that waits: MULTI, each script call (scripts.command), EXEC, then
    the WAIT and ROLE (`after`); one call alone without MULTI and EXEC (a script runs whole by
    itself). Sent on a plain (non-transactional) pipeline: the WAIT must come after the write."""
    made = [scripts.command(name, keys, args, functions, retry) for name, (keys, args) in calls]
    if len(made) == 1:
        return [made[0], *after(acks)]
    return [("MULTI",), *made, ("EXEC",), *after(acks)]


def after(acks: Acks) -> list[tuple[Any, ...]]:
    """What follows a write on its connection: the WAIT (WAITAOF), then ROLE, whose list of the
    replicas connected to the master after the WAIT lets `Fence` see a replica promoted meanwhile."""
    return [acks.command(), ("ROLE",)]


class Waited(NamedTuple):
    """The replies of `after`: the WAIT's (or WAITAOF's), and ROLE's (an exception if refused)."""
    reply: Any
    role: Any


def create_calls(keys: Keys, items: Sequence[tuple[str, str, str, int | None]], chunk: int) -> list[Call]:
    """The create script calls of `items` (Prepared.script_item()), `chunk` jobs per call."""
    return [("create", scripts.create_args(keys, items[start:start + chunk]))
            for start in range(0, len(items), chunk)]


def parse(replies: Sequence[Any], count: int) -> tuple[list[Any] | None, Any]:
    """From the replies of `commands` (read with raise_on_error=False, errors as exceptions): (the
    replies of the `count` script calls, Waited). An error of a call is raised as the plain call
    raises it (nothing ran if it was refused when queued: EXEC aborted). (None, the error) when
    Redis lacked the scripts (scripts.is_unloaded): none ran; load them, send again."""
    queued: Sequence[Any]
    waited = Waited(replies[-2], replies[-1])
    if count == 1:  # no MULTI
        queued, executed = (), replies[:1]
    else:
        queued, executed = replies[:count + 1], replies[count + 1]
    failed = [reply for reply in queued if isinstance(reply, Exception)]
    ran_none = True  # refused when queued: EXEC aborted
    if not failed:
        if isinstance(executed, Exception):
            failed = [executed]
        else:
            failed = [reply for reply in executed if isinstance(reply, Exception)]
            ran_none = len(failed) == len(executed)
    if failed:
        if ran_none and all(scripts.is_unloaded(exc) for exc in failed):
            return None, failed[0]
        raise failed[0]
    return list(executed), waited


def confirm(acks: Acks, reply: Any, what: str, job_ids: Sequence[str], master: Any = None) -> None:
    """Raise ReplicationTimeout when the WAIT (WAITAOF) `reply` (or a Waited) confirms less than
    `acks` wants, or when, per the Waited's ROLE, a replica the master had is a master now (see
    Fence; `master`: where the write went, `where()`). A refusal of WAITAOF (appendonly turned off,
    a server without it) is a ConfigError."""
    if isinstance(reply, Waited):
        _confirm_count(acks, reply.reply, what, job_ids)
        promoted = FENCE.promoted(master, reply.role)
        if promoted is not None:
            raise ReplicationTimeout(what, list(job_ids), acks.replicas, 0, acks.timeout,
                                     promoted=f"{promoted[0]}:{promoted[1]}")
        return
    _confirm_count(acks, reply, what, job_ids)


def _confirm_count(acks: Acks, reply: Any, what: str, job_ids: Sequence[str]) -> None:
    if isinstance(reply, Exception):
        raise refused(acks, reply)
    if acks.aof:
        local, replicas = int(reply[0]), int(reply[1])
        if local < 1 or replicas < acks.replicas:
            raise ReplicationTimeout(what, list(job_ids), acks.replicas, replicas, acks.timeout, local >= 1)
        return
    if int(reply) < acks.replicas:
        raise ReplicationTimeout(what, list(job_ids), acks.replicas, int(reply), acks.timeout)


def refused(acks: Acks, exc: Exception) -> Exception:
    """What to raise for an error reply to the WAIT (WAITAOF): a WAITAOF the server refuses is a
    ConfigError (the write before it was made, and is not confirmed); anything else as it is."""
    text = str(exc).lower()
    if acks.aof and ("unknown command" in text or "appendonly" in text):
        return ConfigError(f"Redis refused WAITAOF ({exc}): the write was made on the master and is "
                           "not confirmed; wait_aof needs Redis >= 7.2 with appendonly on")
    return exc


def run(client: Any, scr: scripts.Scripts, calls: Sequence[Call], acks: Acks,
        failed: BaseException | None = None) -> tuple[list[Any], Any]:
    """Make `calls` on `client` (sync redis-py: one pipeline, so one connection), then WAIT:
    (their replies, the WAIT's reply, for `confirm`). Scripts Redis lacks are loaded and the calls
    sent again, as Scripts.run does (`failed`: a call elsewhere found them missing already).
    On a cluster's routed client, a pipeline that did not run is made again (cluster.RoutedPipeline)."""
    while True:
        if failed is not None:
            scr.functions = scripts.load(client, failed)
        pipe = client.pipeline(transaction=False)
        for command in commands(calls, acks, scr.functions, retry=failed is not None):
            pipe.execute_command(*command)
        results, last = parse(pipe.execute(raise_on_error=False), len(calls))
        if results is not None:
            return results, last
        if failed is not None:  # missing again right after loading them: not a passing state
            raise last
        failed = last


# --- a replica promoted while the old master still takes writes -------------------------------------

Address = tuple[str, int]


class Master(NamedTuple):
    """Where a write went, and how to reach the replicas of that node for the Fence's probe."""
    address: Address
    options: Mapping[str, Any]  # connection options (credentials, TLS) for a probe


#: Connection options a probe of a replica takes from the writing client's pool.
PROBE_OPTIONS = ("username", "password", "db", "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs",
                 "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path", "ssl_check_hostname", "ssl_password")


def where(pool: Any, conn: Any = None) -> Master | None:
    """The Master a write through `pool` (a redis-py or redis.asyncio pool; `conn`: the very
    connection, when known) went to: a routed pool's route (Sentinel, Cluster), else its host and
    port. None for a Unix socket."""
    kwargs = pool.connection_kwargs
    if conn is not None and getattr(conn, "host", None):
        address: Address | None = (conn.host, int(conn.port))
    elif kwargs.get("route") is not None:
        address = kwargs["route"].last_address()
    elif kwargs.get("host") and not kwargs.get("path"):
        address = (kwargs["host"], int(kwargs.get("port") or 6379))
    else:
        address = None
    if address is None:
        return None
    options = {k: v for k, v in kwargs.items() if k in PROBE_OPTIONS}
    options["ssl"] = "SSL" in getattr(pool, "connection_class", type(None)).__name__
    return Master(address, options)


def probe_role(address: Address, options: Mapping[str, Any]) -> str | None:
    """The role ("master", "slave") a node says it has, or None when it cannot be asked within
    PROBE_TIMEOUT (gone, refusing)."""
    client = redis.Redis(host=address[0], port=address[1], socket_timeout=PROBE_TIMEOUT,
                         socket_connect_timeout=PROBE_TIMEOUT, retry=Retry(NoBackoff(), 0),
                         decode_responses=True, **options)
    try:
        return str(client.execute_command("ROLE")[0])
    except (redis.exceptions.RedisError, OSError, IndexError, TypeError):
        return None
    finally:
        client.close()


#: How long a probe of a replica may take; how long its answer "master" stands before it is asked
#: again; how long after a replica left the master it can still stop writes (Sentinel reconfigures
#: or demotes the old master within about 10 s of a switch; a replica an operator detached for
#: good then stops mattering).
PROBE_TIMEOUT = 0.25
VERDICT_SECONDS = 0.5
SUSPECT_SECONDS = 10.0
#: A replica counts as one the master had only if a ROLE listed it this recently: after a switch
#: back to a node that was master before, the replicas it had then (among them the old master,
#: a master until Sentinel demotes it) must not count.
KNOWN_SECONDS = 5.0


class Fence:
    """Sees a failover from the old master's side, so that a write a replica confirmed is not
    reported as safe while another replica has been promoted.

    In a planned Sentinel switch (SENTINEL FAILOVER) the chosen replica is made a master
    (REPLICAOF NO ONE) about 1 s before the other replicas are moved to it, and about 10 s before
    the old master stops taking writes. In between, the old master's other replicas still confirm
    its writes (WAIT), and then lose them when they resynchronise from the new master. But the
    promoted replica left the old master at once: it is missing from the old master's ROLE. So
    after each WAIT, ROLE lists the replicas still connected; a replica that was there before and
    is missing now is asked for its role (at most every VERDICT_SECONDS while it stays missing,
    for SUSPECT_SECONDS), and if it says "master", the write is not confirmed. A replica that is
    gone or restarting is only missing: nothing is stopped. "Was there before" means listed within
    KNOWN_SECONDS: a client that writes to a master less often than that is not fenced.

    What remains: a write a replica confirmed before the promotion, which the promoted replica had
    not received yet at that moment (its replication lag, well under a millisecond on a LAN), and
    a replica the client cannot reach at the address the master lists (NAT: set
    replica-announce-ip). Users who may not run ROLE (it is in @dangerous) get no fence."""

    def __init__(self, probe: Callable[[Address, Mapping[str, Any]], str | None] = probe_role,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probe = probe
        self.clock = clock
        self._lock = threading.Lock()
        self._known: dict[Address, dict[Address, float]] = {}  # master -> {replica: when last listed}
        self._missing_since: dict[tuple[Address, Address], float] = {}
        self._promoted_until: dict[Address, float] = {}
        self.refused = False  # ROLE was refused (an ACL user without @dangerous)

    @staticmethod
    def replicas(role: Any) -> set[Address] | None:
        """The replicas a master's ROLE reply lists; None if the reply is not a master's."""
        if not isinstance(role, (list, tuple)) or len(role) < 3 or str(role[0]) != "master":
            return None
        return {(str(entry[0]), int(entry[1])) for entry in role[2]}

    def suspects(self, master: Master | None, role: Any) -> bool:
        """Whether `role` lists fewer replicas than the master had (confirm() then probes)."""
        if master is None:
            return False
        connected = self.replicas(role)
        return connected is not None and bool(self._recent(master.address, self.clock()) - connected)

    def _recent(self, master: Address, now: float) -> set[Address]:
        return {r for r, at in self._known.get(master, {}).items() if now - at <= KNOWN_SECONDS}

    def promoted(self, master: Master | None, role: Any) -> Address | None:
        """A replica `master` had that is missing from its ROLE reply `role` and says it is a
        master, if there is one."""
        if master is None:
            return None
        if isinstance(role, Exception):
            if not self.refused:
                self.refused = True
                log.warning("wait_replicas: Redis refused ROLE (%s): a write a replica confirmed while "
                            "another replica was being promoted cannot be told apart", role)
            return None
        connected = self.replicas(role)
        if connected is None:
            return None
        now = self.clock()
        with self._lock:
            known = self._known.setdefault(master.address, {})
            missing = self._recent(master.address, now) - connected
            for replica in connected:
                known[replica] = now
                self._missing_since.pop((master.address, replica), None)
            still: set[Address] = set()
            for replica in missing:
                since = self._missing_since.setdefault((master.address, replica), now)
                if now - since < SUSPECT_SECONDS:
                    still.add(replica)
                    known[replica] = now  # stays suspect while missing, up to SUSPECT_SECONDS
                else:
                    del self._missing_since[(master.address, replica)]
                    known.pop(replica, None)
            due = [r for r in still if self._promoted_until.get(r, 0.0) <= now]
        for replica in due:  # asked without the lock: a probe may take PROBE_TIMEOUT
            if self.probe(replica, master.options) == "master":
                self._promoted_until[replica] = now + VERDICT_SECONDS
            else:
                self._promoted_until.pop(replica, None)
                with self._lock:
                    self._known.get(master.address, {}).pop(replica, None)
                    self._missing_since.pop((master.address, replica), None)
        for replica in sorted(still):
            if self._promoted_until.get(replica, 0.0) > now:
                return replica
        return None


#: The process' fence: every client's writes to one master share what it learnt of its replicas.
FENCE = Fence()


async def confirm_async(acks: Acks, reply: Any, what: str, job_ids: Sequence[str], pool: Any) -> None:
    """confirm() for kickq.aio (`pool`: the client's): a probe of a replica (a blocking connect,
    during a failover only) runs in the loop's default executor."""
    master = where(pool)
    if isinstance(reply, Waited) and FENCE.suspects(master, reply.role):
        import asyncio
        import functools
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(confirm, acks, reply, what, job_ids, master))
        return
    confirm(acks, reply, what, job_ids, master)
