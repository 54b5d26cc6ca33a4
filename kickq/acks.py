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

from typing import Any, Mapping, NamedTuple, Sequence

from . import scripts
from .connection import parse_version
from .errors import ConfigError, ReplicationTimeout
from .keys import Keys

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
    """The pipeline of a write that waits: MULTI, each script call (scripts.command), EXEC, WAIT;
    one call alone without MULTI and EXEC (a script runs whole by itself). Sent on a plain
    (non-transactional) pipeline: the WAIT must come after the write."""
    made = [scripts.command(name, keys, args, functions, retry) for name, (keys, args) in calls]
    if len(made) == 1:
        return [made[0], acks.command()]
    return [("MULTI",), *made, ("EXEC",), acks.command()]


def create_calls(keys: Keys, items: Sequence[tuple[str, str, str, int | None]], chunk: int) -> list[Call]:
    """The create script calls of `items` (Prepared.script_item()), `chunk` jobs per call."""
    return [("create", scripts.create_args(keys, items[start:start + chunk]))
            for start in range(0, len(items), chunk)]


def parse(replies: Sequence[Any], count: int) -> tuple[list[Any] | None, Any]:
    """From the replies of `commands` (read with raise_on_error=False, errors as exceptions): (the
    replies of the `count` script calls, the WAIT's reply). An error of a call is raised as the
    plain call raises it (nothing ran if it was refused when queued: EXEC aborted). (None, the
    error) when Redis lacked the scripts (scripts.is_unloaded): none ran; load them, send again."""
    queued: Sequence[Any]
    if count == 1:  # no MULTI
        queued, executed, waited = (), replies[:1], replies[1]
    else:
        queued, executed, waited = replies[:count + 1], replies[count + 1], replies[count + 2]
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


def confirm(acks: Acks, reply: Any, what: str, job_ids: Sequence[str]) -> None:
    """Raise ReplicationTimeout when the WAIT (WAITAOF) `reply` confirms less than `acks` wants.
    A refusal of WAITAOF (appendonly turned off, a server without it) is a ConfigError."""
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
