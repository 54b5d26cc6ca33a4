"""Connections to Redis: options from the config, the version check, and error translation."""
from __future__ import annotations

import codecs
import os
import threading
import weakref
from typing import Any, Callable, Literal, Mapping, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

try:
    import hiredis
except ImportError:  # optional (the `hiredis` extra): redis-py's packer then
    hiredis = None  # type: ignore[assignment]

from . import cluster
from .sentinel import is_sentinel_url
from .errors import KickqError, RedisModeError, RedisUnavailable, RedisVersionError
from .scripts import is_out_of_memory

#: Redis 6.0 brought ACL users and TLS, both of which kickq supports; the scripts rely on
#: effect replication of scripts that read TIME, the default since 5.0.
MIN_REDIS_VERSION = (6, 0, 0)


def redis_url(settings: Mapping[str, Any]) -> str | None:
    return settings.get("redis_url") or os.environ.get("KICKQ_REDIS_URL") or None


def describe(settings: Mapping[str, Any]) -> str:
    """Where Redis is, for messages: never the password."""
    url = redis_url(settings)
    if url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return f"redis://{settings['redis_host']}:{settings['redis_port']}"


def client_scope(settings: Mapping[str, Any]) -> str:
    """What one client may serve, as a key for sharing clients between namespaces: a single
    server's client serves all its namespaces; on a Cluster a client routes one namespace."""
    where = describe(settings)
    if cluster.is_cluster_url(redis_url(settings)):
        return f"{where} namespace {settings['redis_namespace']}"
    return where


def client_identity(settings: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """What a long-lived client was made for: (the settings its connections are made from, its
    client_scope). A change of either needs another client; a change of the scope alone is, on a
    Cluster, another namespace of the same servers (its hotjob waiters stay valid)."""
    made_from = tuple(repr(settings[k]) for k in ("redis_url", "redis_host", "redis_port", "redis_password",
                                                  "redis_options", "redis_timeout"))
    return made_from, client_scope(settings)


def client_options(settings: Mapping[str, Any], retry: Any, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for a redis-py client, sync or asyncio (which differ only in `retry`):
    bounded waits, decoded replies, then `redis_options`, then `overrides`."""
    timeout = float(settings["redis_timeout"])
    kwargs: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "replace",
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        "health_check_interval": 30,
    }
    kwargs.update(settings.get("redis_options") or {})
    kwargs.update(overrides)
    return kwargs


def make_client(cls: Any, settings: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
    """`cls` (redis.Redis or redis.asyncio.Redis) for the configured URL, else host/port/password.
    For a cluster URL, a client of that class whose commands go to the master of the namespace's
    slot (kickq.cluster); for a Sentinel URL, to the master the sentinels name (kickq.sentinel)."""
    url = redis_url(settings)
    if url and (cluster.is_cluster_url(url) or is_sentinel_url(url)):
        make = cluster.async_routed_client if cls is not redis.Redis else cluster.routed_client
        return make(url, settings["redis_namespace"], kwargs, float(settings["redis_timeout"]))
    if url:
        return cls.from_url(url, **kwargs)
    return cls(host=settings["redis_host"], port=settings["redis_port"],
               password=settings["redis_password"], **kwargs)


def connect(settings: Mapping[str, Any], **overrides: Any) -> redis.Redis:
    """A client with bounded waits and no automatic retries.

    No retries, because a create whose reply was lost may have been applied: retrying it would
    make a second job. Long-lived processes (workers, reaper) retry whole steps themselves.
    """
    client: redis.Redis = make_client(redis.Redis, settings,
                                      client_options(settings, Retry(NoBackoff(), 0), **overrides))
    return client


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


#: Before redis-py 5.3, ConnectionPool.get_connection takes a command name; from 5.3 on, passing one
#: is deprecated.
_GET_CONNECTION_WANTS_A_NAME = parse_version(redis.__version__) < (5, 3)


def checkout(pool: Any) -> Any:
    """A connection of `pool` for the caller alone, until `pool.release(conn)`. The pool connects
    it, opens it again when the server closed it meanwhile (its idle `timeout`, a restart, CLIENT
    KILL), and gives a forked child connections of its own."""
    if _GET_CONNECTION_WANTS_A_NAME:
        return pool.get_connection("EVALSHA")  # any name: the pool ignores it
    return pool.get_connection()


def hiredis_packs(client: redis.Redis) -> bool:
    """Whether commands for `client` may be packed by hiredis: it is installed, and it writes text
    as UTF-8, which must then be the client's encoding."""
    return hiredis is not None and codecs.lookup(client.get_encoder().encoding).name == "utf-8"


def packed(conn: Any, commands: Sequence[Sequence[Any]], by_hiredis: bool) -> list[bytes]:
    """`commands` packed for `conn.send_packed_command`. With `by_hiredis` (see hiredis_packs) in
    one call to hiredis.pack_command per command: redis-py's pack_commands encodes each argument in
    Python, and a script call has 13 (a create) to 70 and more (a worker's batch) of them. A
    finish_many call of 19 arguments: 17.4 µs against 2.1, of 73: 79.8 against 14.1 µs (redis-py
    8.2.0, hiredis 3.5.0, 2-core AMD EPYC, 2026-12-07). An argument hiredis cannot write goes to
    redis-py's encoder."""
    if by_hiredis:
        try:
            return [b"".join([hiredis.pack_command(tuple(command)) for command in commands])]
        except TypeError:
            pass
    return conn.pack_commands(commands)  # type: ignore[no-any-return]


class Lane:
    """Single commands on a connection that the calling thread keeps between calls, taken from the
    client's pool.

    Creating one job is a producer's hottest call. redis-py's execute_command also checks a
    connection out of the pool and back in, runs its retry and observability wrappers, and encodes
    each argument in Python; here the thread keeps its connection, the command is packed by
    hiredis (see packed), and the caller's own work (`meanwhile`) runs while Redis works on it.

    Before each call the connection is checked as the pool checks one it lends: connected, and
    opened again when the server closed it (its idle `timeout`, a restart, CLIENT KILL). redis-py
    sends its health-check PING when one is due. The connection goes back to the pool when its
    thread ends; a forked child takes one of its own. Nothing is retried: a create whose reply was
    lost may have been applied. redis-py closes the connection on any error while sending or
    reading, so a call never reads another call's reply.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._by_hiredis = hiredis_packs(client)
        self._local = threading.local()

    def _connection(self) -> Any:
        held = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid():
            held = self._local.held = _Held(self._pool)
            return held.conn  # checked by the pool
        conn = held.conn
        conn.connect()  # nothing to do when connected; fails alone, after one redis_timeout
        try:
            if conn.can_read():  # a reply nobody asked for, or the end of the file
                raise redis.exceptions.ConnectionError("connection has data")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            conn.disconnect()
            conn.connect()
        return conn

    def execute(self, command: Sequence[Any], meanwhile: Callable[[], Any] | None = None) -> Any:
        """Send one command and read its reply. `meanwhile()` runs once the command is sent, before
        its reply is read: the caller's own work then overlaps Redis' (a create's Job is built so).
        An error reply is raised as redis-py's class for it."""
        conn = self._connection()
        conn.send_packed_command(packed(conn, [command], self._by_hiredis))
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                conn.disconnect()  # its reply is never read: the next call must not read it
                raise
        return conn.read_response()


class _Held:
    """A thread's connection of a Lane, given back to the pool when the thread ends (which clears
    its threading.local) or the Lane goes. Given back in a forked child, the parent's connection is
    closed there without a shutdown of the socket the parent still uses (redis-py's fork rule)."""

    __slots__ = ("conn", "pid", "__weakref__")

    def __init__(self, pool: Any) -> None:
        self.conn = checkout(pool)
        self.pid = os.getpid()
        weakref.finalize(self, pool.release, self.conn)


def server_info(client: redis.Redis) -> Mapping[str, Any]:
    """INFO's default sections (redis_version, cluster_enabled...); for an ACL user that may not
    run INFO (it is in @dangerous, with KEYS and FLUSHALL), the version from HELLO instead."""
    try:
        return client.info()
    except redis.exceptions.NoPermissionError:
        try:
            return hello_version(client.execute_command("HELLO"))
        except redis.exceptions.NoPermissionError:
            raise
        except redis.exceptions.ResponseError as exc:
            return hello_refused(exc)


async def async_server_info(client: Any) -> Mapping[str, Any]:
    """server_info() for a redis.asyncio client."""
    try:
        return await client.info()  # type: ignore[no-any-return]
    except redis.exceptions.NoPermissionError:
        try:
            return hello_version(await client.execute_command("HELLO"))
        except redis.exceptions.NoPermissionError:
            raise
        except redis.exceptions.ResponseError as exc:
            return hello_refused(exc)


def hello_version(reply: Any) -> dict[str, str]:
    """{"redis_version": ...} from a HELLO reply (a map in RESP3, a flat list in RESP2). HELLO without
    arguments keeps the connection's protocol and only describes the server."""
    fields = reply if isinstance(reply, Mapping) else dict(zip(reply[::2], reply[1::2], strict=True))
    version = fields.get("version", fields.get(b"version", "0"))
    return {"redis_version": version.decode() if isinstance(version, bytes) else str(version)}


def hello_refused(exc: Exception) -> dict[str, str]:
    """HELLO without arguments needs Redis 6.2; 6.0 and 6.1 know HELLO but want a protocol version
    (enough for kickq); an older server does not know HELLO at all."""
    if "unknown command" in str(exc).lower():
        return {"redis_version": "older than 6.0 (no HELLO command)"}
    return {"redis_version": "6.0"}


#: pub/sub message types: a script's notification (PUBLISH, or SPUBLISH from Redis 7 on), a
#: subscription confirmed, a subscription ended (by us, or by the server when the namespace's
#: slot moved to another node).
NOTIFICATION_TYPES = ("message", "smessage")
SUBSCRIBED_TYPES = ("subscribe", "ssubscribe")
UNSUBSCRIBED_TYPES = ("unsubscribe", "sunsubscribe")


def notifications_sharded(info: Mapping[str, Any]) -> bool:
    """Whether the scripts notify by sharded pub/sub on this server: Redis 7 on (see PUBLISH in
    lua/_lib_core.lua), where a cluster delivers them on the namespace's shard only."""
    return parse_version(str(info.get("redis_version", "0"))) >= (7, 0, 0)


def subscribe_notifications(client: redis.Redis, pubsub: Any, *channels: str) -> None:
    """Subscribe `pubsub` (of `client`) to channels the scripts notify: SSUBSCRIBE or SUBSCRIBE,
    as the server's scripts publish. The confirmation is one of SUBSCRIBED_TYPES."""
    if notifications_sharded(server_info(client)):
        pubsub.ssubscribe(*channels)
    else:
        pubsub.subscribe(*channels)


async def async_subscribe_notifications(client: Any, pubsub: Any, *channels: str) -> None:
    """subscribe_notifications() for redis.asyncio (whose PubSub has no ssubscribe() before
    redis-py 5.1: the command is then sent as it is)."""
    if not notifications_sharded(await async_server_info(client)):
        await pubsub.subscribe(*channels)
    elif hasattr(pubsub, "ssubscribe"):
        await pubsub.ssubscribe(*channels)
    else:
        await pubsub.execute_command("SSUBSCRIBE", *channels)


def check_version(info: Mapping[str, Any]) -> None:
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise RedisVersionError(f"kickq needs Redis >= {need} (ACL users, TLS, script effect "
                                f"replication); this server is {version}")


def check_mode(info: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """A redis:// URL at a Cluster node fails here, whichever node holds the namespace, rather
    than at its first command on another node's slot (MOVED). The reverse is found when the
    slot map is read (kickq.cluster)."""
    if str(info.get("cluster_enabled", "0")) == "1" and not cluster.is_cluster_url(redis_url(settings)):
        raise cluster_node_error(settings)
    if info.get("redis_mode") == "sentinel":  # a sentinel answers INFO, not kickq's scripts
        node = describe(settings).partition("://")[2].partition("/")[0]
        raise RedisModeError(f"Redis at {describe(settings)} is a Redis Sentinel: use "
                             f"redis+sentinel://{node}[,host:port...]/SERVICE (the sentinels, and the "
                             "name of the master they monitor)")


def cluster_node_error(settings: Mapping[str, Any]) -> RedisModeError:
    where = describe(settings)
    node = where.partition("://")[2].partition("/")[0].partition("?")[0]
    return RedisModeError(f"Redis at {where} is a Redis Cluster node: use redis+cluster://{node} "
                          "(any nodes of the cluster, comma-separated)")


class redis_errors:  # noqa: N801 - used as a function: `with redis_errors(settings):`
    """Turn redis-py's errors into kickq's, with where Redis is and without the password.
    (A class: @contextlib.contextmanager costs a create 1.5 µs more.)"""

    __slots__ = ("settings",)

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None:
            return False
        settings = self.settings
        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            raise RedisUnavailable(f"Redis at {describe(settings)} is unavailable: {exc}") from exc
        if (isinstance(exc, redis.exceptions.ResponseError)  # a redis:// URL at a Cluster node
                and isinstance(cluster.not_served_reply(exc), redis.exceptions.MovedError)):
            raise cluster_node_error(settings) from exc
        if is_out_of_memory(exc):
            raise KickqError(f"Redis at {describe(settings)} is out of memory (maxmemory): "
                             "nothing was written") from exc
        return False
