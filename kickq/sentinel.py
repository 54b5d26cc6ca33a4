"""Redis Sentinel: kickq's commands go to the master that the sentinels name, and follow a failover.

A `redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]` URL names the sentinels
and the service (Sentinel's name for one master and its replicas). Which node is the master comes
from the sentinels through redis-py's Sentinel support (its clients of the sentinels and its
check_master_state): of the masters they name and consider up, the one of the newest configuration
(config-epoch), since the sentinels learn of a switch one after the other. (redis-py's own
discover_master believes the first sentinel that answers, which may not have learnt of a switch
yet for about a second.) Commands are sent over the same routed connections as on a Redis Cluster
(kickq.cluster: RoutedConnection, RoutedRedis), whose Route asks a SentinelDiscovery instead of the
slot map:

- a connection connects to the master named now; one still open to the old master moves at its
  next use once the route learnt of the new one;
- a write refused by a node that is a replica now (READONLY: the old master after Sentinel
  reconfigured it), a blocking command cut short by that demotion (UNBLOCKED), a connection that
  could not be opened, and "no sentinel names a master" all mean the command did not run
  (CommandNotRun): user calls make it again for up to redis_timeout, long-lived loops back off;
- the route asks the sentinels again at most every RECHECK_INTERVAL while it is used, so that
  connections leave an old master that Sentinel replaced but has not reconfigured yet (after a
  planned SENTINEL FAILOVER it accepts writes for about 10 s, which are lost when it becomes a
  replica). A sentinel that cannot be asked then leaves the known master in use;
- no command goes to a master that a sentinel says it is failing over (the sentinel leading a
  switch says so at once, the others name the old master until the switch ends): calls wait for
  the new one (MasterBeingReplaced, a CommandNotRun).

The credentials and options of the URL (and redis_options) are the data nodes'. Sentinels get the
same TLS settings and timeouts, and no password unless the URL's query gives `sentinel_password`
(and `sentinel_username`): a deployment's sentinels usually have none, or one of their own.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url, to_bool
from redis.retry import Retry
from redis.sentinel import Sentinel

from .errors import ConfigError, RedisModeError
from .multihost import bracketed, parse_multihost

#: URL schemes of a Sentinel deployment, and the scheme of one data node's URL with the same options.
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}

#: How often (at most, in seconds) a route in use asks the sentinels whether the master changed.
RECHECK_INTERVAL = 1.0


#: Query options of the URL for the sentinels themselves.
SENTINEL_AUTH_OPTIONS = ("sentinel_username", "sentinel_password")


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and url.partition("://")[0].lower() in SENTINEL_SCHEMES  # type: ignore[union-attr]


class SentinelURL:
    """A parsed redis+sentinel:// URL."""

    def __init__(self, sentinels: list[tuple[str, int]], service: str, db: int, node_url: str) -> None:
        self.sentinels = sentinels
        self.service = service
        self.db = db
        #: A data node URL (of the first sentinel's address: only its credentials, database and
        #: options are used) that redis-py's parse_url reads.
        self.node_url = node_url


def parse_sentinel_url(url: str) -> SentinelURL:
    """`redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB][?options]`. Raises
    ConfigError."""
    parts, node_scheme = parse_multihost(url, SENTINEL_SCHEMES, "Sentinel", "sentinel")
    scheme = parts.scheme
    service, _, db = parts.path.partition("/")
    service = unquote(service)
    if not service:
        raise ConfigError(f"{scheme}:// URL: the service (Sentinel's master name) is missing: "
                          f"{scheme}://host:port[,host:port...]/SERVICE[/DB]")
    if db and not db.isdigit():
        raise ConfigError(f"{scheme}:// URL: the database must be a number, got /{db}")
    return SentinelURL(parts.hosts, service, int(db or 0), parts.node_url(node_scheme, db or "0"))


def check_url(url: str) -> None:
    """Raise ConfigError for a Sentinel URL that cannot be used (checked when it is configured)."""
    try:
        _node_kwargs(parse_sentinel_url(url).node_url)
    except ValueError as exc:
        raise ConfigError(f"redis_url: {exc}") from None


def _node_kwargs(node_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the data nodes' connection options from the URL, the sentinels' own auth options)."""
    kwargs = dict(parse_url(node_url))
    auth = {option: kwargs.pop(option) for option in SENTINEL_AUTH_OPTIONS if option in kwargs}
    renamed = {"sentinel_username": "username", "sentinel_password": "password"}
    return kwargs, {renamed[k]: v for k, v in auth.items()}


class SentinelDiscovery:
    """Which node is the master of one service, as the sentinels say. One per process and URL (see
    kickq.cluster.discovery_for); every route of that URL asks it."""

    #: Routes ask again this often while in use (kickq.cluster.Route).
    recheck_interval = RECHECK_INTERVAL

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        self.url = url
        parsed = parse_sentinel_url(url)
        self.service = parsed.service
        self._sentinels = parsed.sentinels
        self.first_node = parsed.sentinels[0]  # a placeholder: every connection asks its route
        kwargs, sentinel_auth = _node_kwargs(parsed.node_url)
        #: TLS: a rediss+sentinel:// URL, or ssl=True in its query or in the client options.
        self.tls = (kwargs.pop("connection_class", None) is not None or bool(to_bool(kwargs.pop("ssl", None)))
                    or bool(options.get("ssl")))
        #: What every routed connection takes from the URL: credentials, database, query options.
        self.connection_kwargs = kwargs
        # The sentinels: the client's timeouts (at most 2 s: a sentinel answers at once, and a
        # frozen one must not hold up discovery long) and TLS options; no retries (discovery asks
        # the next sentinel).
        sentinel_kwargs: dict[str, Any] = {
            k: v for k, v in {**kwargs, **options}.items()
            if k.startswith("ssl") or k in ("socket_timeout", "socket_connect_timeout", "protocol")}
        for name in ("socket_timeout", "socket_connect_timeout"):
            sentinel_kwargs[name] = min(float(sentinel_kwargs.get(name) or 2.0), 2.0)
        sentinel_kwargs.update(sentinel_auth, decode_responses=True, retry=Retry(NoBackoff(), 0),
                               ssl=self.tls)
        if not self.tls:
            sentinel_kwargs = {k: v for k, v in sentinel_kwargs.items() if not k.startswith("ssl_")}
        self._sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_kwargs)
        self._lock = threading.Lock()

    def startup(self) -> str:
        return ",".join(f"{bracketed(h)}:{p}" for h, p in self._sentinels)

    def label(self, namespace: str, slot: int) -> str:
        return f"service {self.service!r}"

    def owner(self, slot: int, stale: bool) -> tuple[str, int]:
        """The (host, port) of the service's master: of the masters the sentinels name and consider
        up (redis-py's Sentinel.check_master_state), the one of the newest configuration (the
        highest config-epoch). After a switch the sentinels learn of it one after the other, over
        about a second: the first that did is believed at once."""
        from .cluster import CommandNotRun, MasterBeingReplaced  # kickq.cluster imports this module

        with self._lock:
            newest: tuple[int, str, int] | None = None
            replaced: set[tuple[str, int]] = set()  # masters a sentinel is failing over
            monitored: set[str] = set()  # the services the sentinels that answered monitor
            unreachable = ""  # why the first sentinel that could not be asked could not
            for client in self._sentinel.sentinels:
                where = client.connection_pool.connection_kwargs
                try:
                    masters = client.sentinel_masters()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    # Its own words: redis-py's MasterNotFoundError has them only after each
                    # client's repr (a few thousand characters).
                    unreachable = unreachable or f"sentinel {where['host']}:{where['port']}: {exc}"
                    continue
                except redis.exceptions.ResponseError as exc:  # SENTINEL is an unknown command there
                    raise self._not_a_sentinel(exc, f"{where['host']}:{where['port']}") from None
                monitored.update(masters if isinstance(masters, dict) else ())
                state = masters.get(self.service) if isinstance(masters, dict) else None
                if state and "failover_in_progress" in str(state.get("flags", "")).split(","):
                    replaced.add((str(state["ip"]), int(state["port"])))
                elif state and self._sentinel.check_master_state(state, self.service):
                    named = (int(state.get("config-epoch") or 0), str(state["ip"]), int(state["port"]))
                    if newest is None or named[0] > newest[0]:
                        newest = named
            if newest is not None and newest[1:] in replaced:
                # The sentinel leading a switch says so first (the others name the old master
                # until it ends): its replicas may drop what it takes from now on.
                raise MasterBeingReplaced(f"a sentinel of {self.startup()} is failing over the master of "
                                          f"service {self.service!r} ({newest[1]}:{newest[2]}): wait for "
                                          "the new one")
            if newest is None:
                if not unreachable and self.service not in monitored:  # a wrong name, not an outage
                    raise ConfigError(f"no sentinel of {self.startup()} monitors a service {self.service!r} "
                                      f"(they monitor: {', '.join(sorted(monitored)) or 'none'})")
                raise CommandNotRun(f"no sentinel of {self.startup()} names a master for service "
                                    f"{self.service!r} now{': ' + unreachable if unreachable else ''}")
        return newest[1], newest[2]

    def _not_a_sentinel(self, refused: Exception, where: str | None = None) -> RedisModeError:
        return RedisModeError(f"{where or self.startup()} is not a Redis Sentinel ({refused}): a "
                              "redis+sentinel:// URL names the sentinels; use redis:// for a single server")

    def close(self) -> None:
        with self._lock:
            for client in self._sentinel.sentinels:
                client.close()
