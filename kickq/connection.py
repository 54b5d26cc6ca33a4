"""Connections to Redis: options from the config, the version check, and error translation."""
from __future__ import annotations

import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable, Literal, Mapping, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

try:
    import hiredis
except ImportError:  # optional (the `hiredis` extra): redis-py's own calls then
    hiredis = None  # type: ignore[assignment]

from .errors import KickqError, RedisUnavailable, RedisVersionError
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
    """`cls` (redis.Redis or redis.asyncio.Redis) for the configured URL, else host/port/password."""
    url = redis_url(settings)
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


_PLAIN_CONNECTIONS = (redis.connection.Connection, redis.connection.UnixDomainSocketConnection)


def packed(conn: Any, commands: Sequence[Sequence[Any]]) -> bytes:
    """`commands` as one write for `conn`, packed by hiredis directly where it is installed: a third
    of the time redis-py's pack_commands takes around the same packer. An argument hiredis cannot
    write goes to redis-py's encoder."""
    if hiredis is not None:
        try:
            return b"".join([hiredis.pack_command(tuple(command)) for command in commands])
        except TypeError:
            pass
    return b"".join(conn.pack_commands(commands))


class _Wire:
    """One command and its reply straight on a connected plain socket, parsed by hiredis: redis-py's
    send_command and read_response around the same socket calls cost about 10 µs of CPU per call
    (bench/README.md, session 9), a tenth of a create. Used once redis-py has connected the socket
    (handshake, auth, db) and read everything it asked for; replies and errors are what redis-py
    would give (its own error classes, its decoding). Any error closes the connection, as redis-py
    does, so a call never reads another call's reply."""

    def __init__(self, sock: socket.socket, conn: Any) -> None:
        self.sock = sock
        kwargs: dict[str, Any] = {"protocolError": redis.exceptions.InvalidResponse,
                                  "replyError": conn._parser.parse_error}
        encoder = conn.encoder
        if encoder.decode_responses:
            kwargs.update(encoding=encoder.encoding, errors=encoder.encoding_errors)
        self.reader = hiredis.Reader(**kwargs)
        self.buffer = bytearray(65536)

    def execute(self, conn: Any, command: Sequence[Any], meanwhile: Callable[[], Any] | None) -> Any:
        sock, reader = self.sock, self.reader
        try:
            sock.sendall(packed(conn, [command]))
            if meanwhile is not None:
                meanwhile()
            reply = reader.gets()
            while reply is False:
                n = sock.recv_into(self.buffer)
                if not n:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                reader.feed(self.buffer, 0, n)  # type: ignore[arg-type]  # any buffer
                reply = reader.gets()
        except socket.timeout:
            conn.disconnect()
            raise redis.exceptions.TimeoutError(f"Timeout reading from {conn.host}:{conn.port}") from None
        except OSError as exc:
            conn.disconnect()
            raise redis.exceptions.ConnectionError(f"Error while talking to {conn.host}:{conn.port}: "
                                                   f"{exc}") from exc
        except BaseException:
            conn.disconnect()
            raise
        if conn.health_check_interval:
            conn.next_health_check = time.monotonic() + conn.health_check_interval  # as redis-py
        if isinstance(reply, Exception):  # an error reply, as parse_error classed it (not always a
            raise reply  # ResponseError: LOADING is a BusyLoadingError, a ConnectionError)
        return reply


class Lane:
    """Single commands on a connection of the calling thread's own, outside the client's pool.

    Creating one job is a producer's hottest call. Through redis-py's pool every command also pays
    the checkout, the release and the command wrapper, about a sixth of a whole create on loopback
    (bench/README.md); a connection kept per thread skips them. It is made with the pool's own
    settings (address, auth, TLS, db, timeouts, health checks) and, like the pool, never retries:
    a create whose reply was lost may have been applied. redis-py closes the connection on any
    error while sending or reading, so a call never reads another call's reply; the next call
    connects again. A process forked from this one opens its own.
    """

    def __init__(self, client: redis.Redis, lean: bool = True) -> None:
        self.lean = lean  # the lean path (_Wire) where it applies; False: redis-py's calls always
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        self._connection_kwargs = pool.connection_kwargs
        self._local = threading.local()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()  # a thread's ends with the thread
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._connection_class(**self._connection_kwargs)
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._open.add(conn)
        # As the pool does before lending a connection. Connecting fails alone (one redis_timeout,
        # not two); a connection that has something to read was closed by the server (its idle
        # `timeout`, a restart, CLIENT KILL) and is opened again.
        conn.connect()  # nothing to do when connected
        try:
            if self._has_data(local, conn):
                raise redis.exceptions.ConnectionError("connection has data")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            conn.disconnect()
            conn.connect()
        return conn

    @staticmethod
    def _has_data(local: Any, conn: Any) -> bool:
        """Whether the server wrote anything (a close is an end of file) since the last reply.
        On a plain socket one poll(0) asks it: a sixth of the cost of redis-py's can_read(), which
        sets the socket's timeout twice and tries a read (bench/README.md, enqueue one by one)."""
        sock = getattr(conn, "_sock", None)
        if type(sock) is not socket.socket or not hasattr(select, "poll"):
            return bool(conn.can_read())  # TLS may hold decrypted bytes a poll cannot see
        if getattr(local, "polled", None) is not sock:
            local.poller = select.poll()
            local.poller.register(sock, select.POLLIN)
            local.polled = sock
        return bool(local.poller.poll(0))

    def execute(self, command: Sequence[Any], meanwhile: Callable[[], Any] | None = None) -> Any:
        """Send one command and read its reply. `meanwhile()` runs once the command is sent, before
        its reply is read: the caller's own work then overlaps Redis' (a create's Job is built so)."""
        conn = self._connection()
        wire = self._wire(conn)
        if wire is not None:
            return wire.execute(conn, command, meanwhile)
        conn.send_command(*command)
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                conn.disconnect()  # its reply is never read: the next call must not read it
                raise
        return conn.read_response()

    def _wire(self, conn: Any) -> "_Wire | None":
        """The lean path to `conn`'s socket, where it applies (see _Wire); else None."""
        if getattr(conn, "health_check_interval", 0) and time.monotonic() > conn.next_health_check:
            conn.check_health()  # a PING after that long without a reply, as send_command does
        local = self._local
        sock = getattr(conn, "_sock", None)
        wire = getattr(local, "wire", None)
        if wire is not None and wire.sock is sock:
            return wire  # type: ignore[no-any-return]
        wire = None
        # Plain TCP or Unix connections only: not TLS (its socket may hold decrypted bytes), nor
        # redis-py's client-side cache (another class).
        if (self.lean and hiredis is not None and type(sock) is socket.socket
                and type(conn) in _PLAIN_CONNECTIONS and hasattr(conn, "next_health_check")):
            wire = _Wire(sock, conn)
        local.wire = wire
        return wire

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), weakref.WeakSet()
        for conn in conns:
            conn.disconnect()


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def server_info(client: redis.Redis) -> Mapping[str, Any]:
    """INFO's server section; for an ACL user that may not run INFO (it is in @dangerous, with KEYS
    and FLUSHALL), the version from HELLO instead."""
    try:
        return client.info("server")
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
        return await client.info("server")  # type: ignore[no-any-return]
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


def check_version(info: Mapping[str, Any]) -> None:
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise RedisVersionError(f"kickq needs Redis >= {need} (ACL users, TLS, script effect "
                                f"replication); this server is {version}")


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
        if is_out_of_memory(exc):
            raise KickqError(f"Redis at {describe(settings)} is out of memory (maxmemory): "
                             "nothing was written") from exc
        return False
