"""Redis Cluster: each namespace's commands go to the master that holds the namespace's slot.

Every key of a namespace carries the hash tag "{ns}", so a namespace is one hash slot and lives
whole on one master. kickq therefore talks to one node per namespace, exactly as it talks to a
single server: scripts, MULTI/EXEC pipelines, blocking waits and the pub/sub of hotjobs and
reapers all go over connections to that node. Which node that is comes from redis-py's own
cluster client (`redis.cluster.RedisCluster`): it reads the slot map from the startup nodes of
the `redis+cluster://` URL, and again when the map changed.

Commands are not sent through RedisCluster itself: it retries a command after a lost connection
(which could write a create twice), and its pipelines are not transactions on every redis-py
kickq supports. Instead the namespace's connections are of a routed class (RoutedConnection):

- connect() asks the Route for the slot's master now, and drops a socket still open to another;
- a reply that says the node does not serve the slot now (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a
  write refused by a replica) and a connection that could not be opened are raised as
  CommandNotRun, a ConnectionError: the command did not run. The route learns from it (MOVED
  names the new owner; the others make it read the slot map again).

A caller that may repeat a command which did not run does so (`rerouted`), for up to
redis_timeout; everything else treats CommandNotRun as any lost connection, which kickq already
handles safely (a worker's outcomes are saved again by their tokens; a user's call raises
RedisUnavailable).

While a slot migrates, every script is refused: each declares, beside the namespace's id key, a
key that never exists (layout.ROUTE_GUARD). Redis refuses a multi-key command on a migrating slot
when some of its keys are missing (TRYAGAIN on the source, and on the target even after ASKING),
so no script runs while the namespace's keys are split between two nodes, and every key a script
derives from the prefix is on the node that runs it. See docs/scaling.md.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Callable, Mapping, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.client
import redis.asyncio.connection as aioconnection
import redis.client
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, SSLConnection, parse_url, to_bool
from redis.crc import key_slot

from .backoff import Backoff
from .errors import ConfigError, RedisModeError
from .multihost import bracketed, parse_multihost
from .sentinel import SentinelDiscovery, is_sentinel_url
from .sentinel import check_url as sentinel_check_url

#: URL schemes of a cluster, and the scheme of one node's URL that carries the same options.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: Replies by which a node says it does not serve the slot now: the command did not run there.
NOT_SERVED = tuple(cls for cls in (
    redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError, redis.exceptions.ReadOnlyError,
    getattr(redis.exceptions, "MasterDownError", None)) if cls is not None)

def not_served_reply(exc: redis.exceptions.ResponseError) -> redis.exceptions.ResponseError | None:
    """`exc` as one of NOT_SERVED when it is a reply by which a node says it does not serve the slot
    now, else None. redis-py before 6 raises MOVED, ASK, TRYAGAIN and CLUSTERDOWN from a plain
    client as a ResponseError whose text begins with the code; later versions as their classes."""
    if isinstance(exc, NOT_SERVED):
        return exc
    code, _, rest = str(exc).partition(" ")
    if code == "MOVED":
        return redis.exceptions.MovedError(rest)
    if code == "ASK":
        return redis.exceptions.AskError(rest)
    if code == "TRYAGAIN":
        return redis.exceptions.TryAgainError(str(exc))
    if code in ("CLUSTERDOWN", "MASTERDOWN"):
        return redis.exceptions.ClusterDownError(str(exc))
    if code == "READONLY":
        return redis.exceptions.ReadOnlyError(str(exc))
    if code == "UNBLOCKED":  # a blocking command on a master that Sentinel turned into a replica
        return redis.exceptions.ReadOnlyError(str(exc))
    return None


#: What reading the slot map may raise (redis-py's RedisClusterException is not a RedisError).
_DISCOVERY_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)

#: The least time between two reads of the slot map by one process for one cluster URL: many
#: connections meet a failover at once, and one read serves them all.
REFRESH_INTERVAL = 0.2


class CommandNotRun(redis.exceptions.ConnectionError):
    """The namespace's master could not be reached, or the node reached does not serve its slot
    now (the slot moved, is migrating, or its master failed): the command did not run."""


class MasterBeingReplaced(CommandNotRun):
    """A sentinel is failing over the master (Sentinel): no command is sent to it, even while the
    other sentinels still name it."""


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and url.partition("://")[0].lower() in CLUSTER_SCHEMES  # type: ignore[union-attr]


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """`redis+cluster://[user:password@]host:port[,host:port...][/0][?options]` -> (the startup
    nodes, a URL of the first node with the same credentials and options). Raises ConfigError."""
    parts, node_scheme = parse_multihost(url, CLUSTER_SCHEMES, "cluster", "node")
    if parts.path not in ("", "0"):
        raise ConfigError(f"{parts.scheme}:// URL: a Redis Cluster has database 0 only, got /{parts.path}")
    return parts.hosts, parts.node_url(node_scheme, "0")


def check_url(url: str) -> None:
    """Raise ConfigError for a cluster or Sentinel URL that cannot be used (checked when it is
    configured)."""
    if is_sentinel_url(url):
        sentinel_check_url(url)
    elif is_cluster_url(url):
        try:
            parse_url(parse_cluster_url(url)[1])
        except ValueError as exc:
            raise ConfigError(f"redis_url: {exc}") from None


class Discovery:
    """The slot map of one cluster, as redis-py's RedisCluster reads it from the startup nodes.
    One per process and cluster URL (see discovery_for); every namespace's Route asks it."""

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        self.url = url
        self._nodes, node_url = parse_cluster_url(url)
        self.first_node = self._nodes[0]
        #: What every routed connection takes from the URL: credentials and its query's options.
        self.connection_kwargs = kwargs = dict(parse_url(node_url))
        kwargs.pop("db", None)
        #: TLS: a rediss+cluster:// URL, or ssl=True in its query or the client options (as
        #: redis-py's Redis and RedisCluster take it).
        self.tls = (kwargs.pop("connection_class", None) is not None or bool(to_bool(kwargs.pop("ssl", None)))
                    or bool(options.get("ssl")))
        self._kwargs = {**kwargs, **options, "ssl": self.tls}
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._refreshed = 0.0
        _locked.add(self)

    def _client(self) -> RedisCluster:
        if self._cluster is None:
            try:
                self._cluster = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],
                    require_full_coverage=False, **self._kwargs)
            except _DISCOVERY_ERRORS as exc:
                if "not enabled" in str(exc):
                    raise not_a_cluster(self.url) from None
                raise CommandNotRun(f"cannot read the slot map from {self.startup()}: {exc}") from exc
            self._refreshed = time.monotonic()
        return self._cluster

    #: A route of a cluster learns of a new owner from the nodes' replies (MOVED); it need not ask.
    recheck_interval: float | None = None

    def startup(self) -> str:
        return ",".join(f"{bracketed(h)}:{p}" for h, p in self._nodes)

    def label(self, namespace: str, slot: int) -> str:
        return f"namespace {namespace!r} (slot {slot})"

    def owner(self, slot: int, stale: bool) -> tuple[str, int]:
        """The (host, port) of the master that holds `slot`; with `stale`, after reading the slot
        map again (at most once per REFRESH_INTERVAL)."""
        with self._lock:
            cluster = self._client()
            if stale and time.monotonic() - self._refreshed >= REFRESH_INTERVAL:
                self._refreshed = time.monotonic()
                try:
                    cluster.nodes_manager.initialize()
                except _DISCOVERY_ERRORS:
                    # None of the nodes it learnt answers (redis-py replaces the URL's startup
                    # nodes by the nodes it discovers): start again from the URL's.
                    self._forget()
                    cluster = self._client()
            try:
                node = cluster.nodes_manager.get_node_from_slot(slot)
            except (*_DISCOVERY_ERRORS, IndexError, KeyError) as exc:
                raise CommandNotRun(f"no master serves slot {slot} now: {exc}") from exc
            return node.host, int(node.port)

    def _forget(self) -> None:
        if self._cluster is not None:
            try:
                self._cluster.close()
            except _DISCOVERY_ERRORS:
                pass
            self._cluster = None

    def close(self) -> None:
        with self._lock:
            self._forget()


def not_a_cluster(url: str) -> RedisModeError:
    scheme, _, rest = url.partition("://")
    return RedisModeError(f"{scheme}://{rest.rpartition('@')[2]} is not a Redis Cluster (cluster mode is "
                          "off on that server): use a redis:// URL for a single server")


class Route:
    """Where one namespace's commands go now: the master that holds its slot (a Cluster), or the
    master the sentinels name (kickq.sentinel). Shared by the connections of one client (and its
    threads)."""

    def __init__(self, discovery: Discovery | SentinelDiscovery, namespace: str) -> None:
        self.discovery = discovery
        self.namespace = namespace
        self.slot = key_slot(("{" + namespace + "}").encode())
        self.label = discovery.label(namespace, self.slot)
        self._lock = threading.Lock()
        self._address: tuple[str, int] | None = None
        self._stale = False
        # Where the discovery must be asked again now and then (Sentinel), when that is next due.
        self._recheck_interval = discovery.recheck_interval
        self._next_check = 0.0
        _locked.add(self)

    def known_address(self) -> tuple[str, int] | None:
        """The owner as last learnt, without asking the discovery (None: it must be asked)."""
        if self._recheck_interval is not None and time.monotonic() >= self._next_check:
            return None
        return self._address

    def last_address(self) -> tuple[str, int] | None:
        """Where connections went last (None: nowhere yet), with no check of whether it is due."""
        return self._address

    def address(self) -> tuple[str, int]:
        address = self.known_address()
        if address is not None:
            return address
        with self._lock:
            if self._address is None:
                self._address = self.discovery.owner(self.slot, self._stale)
                self._stale = False
                self._checked()
            elif self._recheck_interval is not None and time.monotonic() >= self._next_check:
                self._checked()
                try:
                    self._address = self.discovery.owner(self.slot, True)
                except MasterBeingReplaced:
                    self._address = None  # asked again at the next connect
                    raise
                except CommandNotRun:
                    pass  # no sentinel to ask, or none names a master: keep the one known
            return self._address

    def _checked(self) -> None:
        if self._recheck_interval is not None:
            self._next_check = time.monotonic() + self._recheck_interval

    def not_served(self, exc: BaseException, address: tuple[str, int]) -> None:
        """The node at `address` refused a command with `exc` (see NOT_SERVED) or could not be
        reached. MOVED names the new owner; ASK and TRYAGAIN mean the slot is migrating: its keys
        are read on the same node again once the move is over (that node then says MOVED)."""
        moved = isinstance(exc, redis.exceptions.MovedError)  # a subclass of AskError
        if not moved and isinstance(exc, (redis.exceptions.AskError, redis.exceptions.TryAgainError)):
            return
        with self._lock:
            if self._address != address:
                return  # someone learnt already
            if moved and exc.slot_id == self.slot:  # type: ignore[attr-defined]
                self._address = (exc.host, int(exc.port))  # type: ignore[attr-defined]
                return
            self._address = None
            self._stale = True


def _not_run_message(route: Route, address: tuple[str, int], exc: BaseException) -> str:
    host, port = address
    if isinstance(exc, redis.exceptions.MovedError):  # before AskError, its base class
        why = "moved to another node"
    elif isinstance(exc, (redis.exceptions.TryAgainError, redis.exceptions.AskError)):
        why = "is migrating to another node"
    elif isinstance(exc, redis.exceptions.ReadOnlyError):
        why = "is not served by this node now (it is a replica)"
    elif isinstance(exc, NOT_SERVED):
        why = "has no master serving it now"
    else:
        why = "is on a node that could not be reached"
    return (f"{route.label} {why}: {host}:{port} said "
            f"{type(exc).__name__}: {exc}; the command did not run")


class _RoutedMixin:
    """Connection methods that route to the namespace's master (see the module docstring)."""

    route: Route
    host: str
    port: int

    def _take_route(self, kwargs: dict[str, Any]) -> None:
        self.route = kwargs.pop("route")

    def connect(self) -> None:
        address = self.route.address()
        if (self.host, self.port) != address:
            self.disconnect()  # type: ignore[attr-defined]
            self.host, self.port = address
        try:
            super().connect()  # type: ignore[misc]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if isinstance(exc, CommandNotRun):
                raise
            self.route.not_served(exc, address)
            raise CommandNotRun(_not_run_message(self.route, address, exc)) from exc

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.exceptions.ResponseError as exc:
            refusal = not_served_reply(exc)
            if refusal is None:
                raise
            self._not_served(refusal)
            raise CommandNotRun(_not_run_message(self.route, (self.host, self.port), refusal)) from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.route.not_served(exc, (self.host, self.port))
            raise

    def _not_served(self, exc: BaseException) -> None:
        self.route.not_served(exc, (self.host, self.port))
        self.disconnect()  # type: ignore[attr-defined]


def left_behind(pubsub: Any) -> bool:
    """Whether the connection a PubSub (or a connection) holds is to another node than its route
    names now (Sentinel named a new master; the route asks at most every recheck_interval): its
    holder should drop it and subscribe again. Never while no master is named."""
    conn = getattr(pubsub, "connection", pubsub)
    route = getattr(conn, "route", None)
    if route is None:
        return False
    try:
        return bool(route.address() != (conn.host, conn.port))
    except CommandNotRun:
        return False


async def async_left_behind(pubsub: Any) -> bool:
    """left_behind() for redis.asyncio: when the route must ask the sentinels, in the loop's default
    executor."""
    import asyncio
    conn = getattr(pubsub, "connection", pubsub)
    route = getattr(conn, "route", None)
    if route is None:
        return False
    address = route.known_address()
    if address is None:
        return await asyncio.get_running_loop().run_in_executor(None, left_behind, pubsub)
    return bool(address != (conn.host, conn.port))


class RoutedConnection(_RoutedMixin, Connection):
    def __init__(self, **kwargs: Any) -> None:
        self._take_route(kwargs)
        super().__init__(**kwargs)


class RoutedSSLConnection(_RoutedMixin, SSLConnection):
    def __init__(self, **kwargs: Any) -> None:
        self._take_route(kwargs)
        super().__init__(**kwargs)


class _AsyncRoutedMixin:
    """The asyncio twin of _RoutedMixin. Reading the slot map is blocking I/O: it runs in the
    loop's default executor."""

    route: Route
    host: str
    port: int

    def _take_route(self, kwargs: dict[str, Any]) -> None:
        self.route = kwargs.pop("route")

    async def connect(self) -> None:
        import asyncio
        address = self.route.known_address()
        if address is None:
            address = await asyncio.get_running_loop().run_in_executor(None, self.route.address)
        if (self.host, self.port) != address:
            await self.disconnect()  # type: ignore[attr-defined]
            self.host, self.port = address
        try:
            await super().connect()  # type: ignore[misc]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if isinstance(exc, CommandNotRun):
                raise
            self.route.not_served(exc, address)
            raise CommandNotRun(_not_run_message(self.route, address, exc)) from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.exceptions.ResponseError as exc:
            refusal = not_served_reply(exc)
            if refusal is None:
                raise
            self.route.not_served(refusal, (self.host, self.port))
            await self.disconnect()  # type: ignore[attr-defined]
            raise CommandNotRun(_not_run_message(self.route, (self.host, self.port), refusal)) from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.route.not_served(exc, (self.host, self.port))
            raise


class AsyncRoutedConnection(_AsyncRoutedMixin, aioconnection.Connection):
    def __init__(self, **kwargs: Any) -> None:
        self._take_route(kwargs)
        super().__init__(**kwargs)


class AsyncRoutedSSLConnection(_AsyncRoutedMixin, aioconnection.SSLConnection):
    def __init__(self, **kwargs: Any) -> None:
        self._take_route(kwargs)
        super().__init__(**kwargs)


_discoveries: dict[tuple[str, str], Discovery | SentinelDiscovery] = {}
_discoveries_lock = threading.Lock()
_discoveries_pid = os.getpid()
#: Every Discovery and Route of the process: a forked child gives each a new lock (another
#: thread of the parent may have held one at the fork).
_locked: "weakref.WeakSet[Discovery | SentinelDiscovery | Route]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _discoveries_lock
    _discoveries_lock = threading.Lock()
    for holder in list(_locked):
        holder._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def discovery_for(url: str, options: Mapping[str, Any]) -> Discovery | SentinelDiscovery:
    """The process' Discovery for this cluster URL (or SentinelDiscovery for this Sentinel URL) and
    these client options (a forked child makes its own)."""
    global _discoveries_pid
    key = (url, repr(sorted((k, repr(v)) for k, v in options.items())))
    with _discoveries_lock:
        if _discoveries_pid != os.getpid():
            _discoveries.clear()
            _discoveries_pid = os.getpid()
        found = _discoveries.get(key)
        if found is None:
            found = _discoveries[key] = (SentinelDiscovery(url, options) if is_sentinel_url(url)
                                         else Discovery(url, options))
            _locked.add(found)
        return found


def close_discoveries() -> None:
    """Close the process' slot-map clients (kickq.reset() does: it closes every connection kickq
    opened). A Route that still holds one reads the slot map again when it next needs to."""
    with _discoveries_lock:
        found = list(_discoveries.values())
        _discoveries.clear()
    for discovery in found:
        discovery.close()


def _discovery_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The client options that also apply to reading the slot map: DISCOVERY_OPTIONS and every TLS
    option (ssl, ssl_*), so that the slot map is read as the namespace's commands are sent."""
    return {k: v for k, v in options.items() if k in DISCOVERY_OPTIONS or _is_tls_option(k)}


def _is_tls_option(key: str) -> bool:
    return key == "ssl" or key.startswith("ssl_")


#: Client options (from kickq's settings and redis_options) passed on to redis-py's RedisCluster,
#: besides the TLS ones.
DISCOVERY_OPTIONS = ("socket_timeout", "socket_connect_timeout", "username", "password", "client_name",
                     "protocol")


def pool_kwargs(url: str, namespace: str, options: Mapping[str, Any], asyncio: bool) -> dict[str, Any]:
    """Keyword arguments of a ConnectionPool (sync, or redis.asyncio's) whose connections go to
    the master of `namespace`'s slot; `options` are the client's (timeouts, decode_responses, retry...)."""
    discovery = discovery_for(url, _discovery_options(options))
    tls = discovery.tls
    # redis-py's connection classes take no `ssl` (its Redis turns it into the connection class),
    # and a plain one no ssl_* either: without TLS they are ignored, as Redis and RedisCluster do.
    kwargs = {k: v for k, v in {**discovery.connection_kwargs, **options}.items()
              if not (k == "ssl" or (not tls and _is_tls_option(k)))}
    kwargs["host"], kwargs["port"] = discovery.first_node
    if asyncio:
        kwargs["connection_class"] = AsyncRoutedSSLConnection if tls else AsyncRoutedConnection
    else:
        kwargs["connection_class"] = RoutedSSLConnection if tls else RoutedConnection
    kwargs["route"] = Route(discovery, namespace)
    return kwargs


class RoutedRedis(redis.Redis):
    """A redis-py client of one namespace on a cluster. A command or pipeline that did not run
    (CommandNotRun) is made again, for up to `reroute_timeout` seconds. kickq's pipelines are
    MULTI/EXEC transactions (refused whole, or run whole) or reads and repeatable sweeps, so
    running one again is safe."""

    reroute_timeout = 5.0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        run = super().execute_command
        return rerouted(lambda: run(*args, **options), self.reroute_timeout)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = RoutedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.reroute_timeout = self.reroute_timeout
        return pipe


class RoutedPipeline(redis.client.Pipeline):
    reroute_timeout = 5.0

    def execute(self, raise_on_error: bool = True) -> Any:
        if self.watching:
            return super().execute(raise_on_error)
        stack, scripts = list(self.command_stack), set(self.scripts)

        def attempt() -> Any:
            self.command_stack, self.scripts = list(stack), set(scripts)
            return redis.client.Pipeline.execute(self, raise_on_error)

        return rerouted(attempt, self.reroute_timeout)


class AsyncRoutedRedis(aioredis.Redis):
    """RoutedRedis for redis.asyncio."""

    reroute_timeout = 5.0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        run = super().execute_command
        return await rerouted_async(lambda: run(*args, **options), self.reroute_timeout)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = AsyncRoutedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.reroute_timeout = self.reroute_timeout
        return pipe


class AsyncRoutedPipeline(aioredis.client.Pipeline):
    reroute_timeout = 5.0

    async def execute(self, raise_on_error: bool = True) -> Any:
        if self.watching:
            return await super().execute(raise_on_error)
        stack, scripts = list(self.command_stack), set(self.scripts)

        async def attempt() -> Any:
            self.command_stack, self.scripts = list(stack), set(scripts)
            return await aioredis.client.Pipeline.execute(self, raise_on_error)

        return await rerouted_async(attempt, self.reroute_timeout)


def routed_client(url: str, namespace: str, options: Mapping[str, Any],
                  reroute_timeout: float) -> RoutedRedis:
    """A redis-py client whose commands go to the master of `namespace`'s slot (see RoutedRedis)."""
    pool = redis.ConnectionPool(**pool_kwargs(url, namespace, options, False))
    client = RoutedRedis(connection_pool=pool)
    # The pool is the client's own: close() must close its connections, as from_url()'s do (a
    # client made on a given pool leaves it open).
    client.auto_close_connection_pool = True
    client.reroute_timeout = reroute_timeout
    return client


def async_routed_client(url: str, namespace: str, options: Mapping[str, Any],
                        reroute_timeout: float) -> AsyncRoutedRedis:
    """routed_client() for redis.asyncio."""
    pool = aioredis.ConnectionPool(**pool_kwargs(url, namespace, options, True))
    client = AsyncRoutedRedis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as in routed_client()
    client.reroute_timeout = reroute_timeout
    return client


T = TypeVar("T")


def rerouted(call: Callable[[], T], timeout: float) -> T:
    """`call()`, made again while it fails with CommandNotRun (it did not run), for up to
    `timeout` seconds; then its last error is raised."""
    deadline = time.monotonic() + timeout
    backoff = Backoff(first=0.02, cap=0.5)
    while True:
        try:
            return call()
        except CommandNotRun:
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)


async def rerouted_async(call: Callable[[], Any], timeout: float) -> Any:
    """rerouted() for a coroutine function."""
    import asyncio
    deadline = time.monotonic() + timeout
    backoff = Backoff(first=0.02, cap=0.5)
    while True:
        try:
            return await call()
        except CommandNotRun:
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
