"""Test helpers: polling, free ports and private redis-server processes."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Override the redis-server binary with KICKQ_REDIS_SERVER=/path/to/redis-server.
REDIS_SERVER_ENV = "KICKQ_REDIS_SERVER"


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError (with ``message``) if ``timeout`` seconds pass first.
    The predicate is always called at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"timed out after {timeout:.2f}s waiting for condition"
                + (f": {message}" if message else "")
            )
        time.sleep(min(interval, remaining))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def new_namespace() -> str:
    """A unique key namespace like ``kt-1a2b3c4d``."""
    return f"kt-{uuid.uuid4().hex[:8]}"


def redis_server_binary() -> str | None:
    """Path of the redis-server binary, or None if there is none."""
    explicit = os.environ.get(REDIS_SERVER_ENV)
    if explicit:
        return explicit
    return shutil.which("redis-server")


def ping(host: str, port: int, timeout: float = 0.5, tls_ca: str | os.PathLike[str] | None = None) -> bool:
    """True if a Redis server at host:port answers PING with PONG.

    Uses a raw socket so it works without redis-py; a server that is still
    loading its dataset answers -LOADING, which counts as not ready. With
    ``tls_ca`` the port is a TLS port, whose certificate that CA signed.
    """
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            if tls_ca is not None:
                s = stack.enter_context(ssl.create_default_context(cafile=str(tls_ca)).wrap_socket(
                    s, server_hostname=host))
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"+PONG")
    except OSError:
        return False


def log_tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a server's log, for a failure message."""
    if path is None:
        return "<no log>"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def poll_until(predicate: Callable[[], T | None], timeout: float, what: str, details: Callable[[], str],
               error: type[Exception] = RuntimeError, interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns something truthy, for the harnesses of real Redis
    topologies: a RedisError counts as not yet. At the deadline, raise ``error`` saying what was
    awaited, the last RedisError, and ``details()`` (log tails)."""
    import redis

    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        value: T | None
        try:
            value = predicate()
        except redis.RedisError as exc:
            value = None
            last_error = f"{type(exc).__name__}: {exc}"
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(
                f"timed out after {timeout:.1f}s waiting until {what}"
                + (f" (last error: {last_error})" if last_error else "")
                + "\n"
                + details()
            )
        time.sleep(interval)


def stop_redis(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a redis-server started by start_redis (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def start_redis(
    tmpdir: str | os.PathLike[str],
    *extra_args: str,
    host: str = "127.0.0.1",
    startup_timeout: float = 10.0,
    attempts: int = 5,
) -> tuple[subprocess.Popen, int]:
    """Start a private redis-server on a free port of ``host``; return (proc, port).

    The server runs in the foreground with no persistence
    (``--save "" --appendonly no``) and its working dir (RDB/AOF files) in
    ``tmpdir``; its log goes to ``tmpdir/redis-<port>.log``. ``extra_args``
    are appended after the defaults, so later settings win, e.g.
    ``start_redis(d, "--appendonly", "yes", "--appendfsync", "always")``.

    If the port turns out to be taken (another process grabbed it between
    choosing and binding), a new port is tried, up to ``attempts`` times.
    Stop the server with stop_redis(proc).
    """
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError(
            "redis-server not found on PATH (install it, e.g. apt-get install redis-server, "
            f"or set {REDIS_SERVER_ENV})"
        )
    workdir = Path(tmpdir)
    workdir.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for _ in range(attempts):
        port = free_port(host)
        logfile = workdir / f"redis-{port}.log"
        cmd = [
            binary,
            "--bind", host,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            *extra_args,
        ]
        with open(logfile, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break  # exited: most likely the port was taken
            if ping(host, port):
                # Make sure the PONG came from our process, not a squatter.
                if proc.poll() is None:
                    return proc, port
                break
            time.sleep(0.01)
        else:
            stop_redis(proc)
            raise RuntimeError(
                f"redis-server on {host}:{port} did not answer PING within "
                f"{startup_timeout}s; log tail:\n{log_tail(logfile)}"
            )
        stop_redis(proc)
        errors.append(f"port {port}: exit code {proc.returncode}\n{log_tail(logfile, 5)}")
    raise RuntimeError(
        f"could not start redis-server after {attempts} attempts:\n" + "\n".join(errors)
    )


def make_certs(directory: Path) -> dict[str, Path]:
    """A test CA, a server certificate it signed for 127.0.0.1, and an unrelated CA (openssl).

    The server certificate is also good as a client certificate: a TLS Redis Cluster's nodes
    present it to each other on the cluster bus, where Redis always asks for one."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=kickq test CA",
        # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a CA must say so, critically.
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-days",
        "2",
        "-subj",
        "/CN=some other CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return {name: d / f"{name}" for name in ("ca.crt", "server.crt", "server.key", "other.crt")}


def redis_now(r) -> int:
    """Redis' clock in epoch ms (what the scripts use when no time is passed in)."""
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


def subscribers(r, channel: str) -> int:
    """Clients subscribed to a channel the scripts notify: by SSUBSCRIBE (Redis 7 on) or SUBSCRIBE."""
    plain = r.pubsub_numsub(channel)[0][1]
    try:
        sharded = r.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    except Exception:  # Redis 6: no sharded pub/sub
        return int(plain)
    return int(plain) + int(sharded[1])


def raw_client(url: str, namespace: str, **options: Any) -> Any:
    """A redis-py client (decode_responses=True) for a test's own reads and writes of one
    namespace's keys: on a single server a plain client; on a cluster a client whose every
    command goes to the master holding the namespace's slot (kickq's own routed connections),
    so server commands (INFO, CLIENT LIST, SCRIPT FLUSH...) reach the node that runs its
    scripts, and a test's own keys belong on that node: tag them with ``{namespace}``."""
    import redis

    from kickq import cluster

    options = {"decode_responses": True, **options}
    if cluster.is_cluster_url(url):
        return cluster.routed_client(url, namespace, options, reroute_timeout=10.0)
    return redis.Redis.from_url(url, **options)


def raw_async_client(url: str, namespace: str, **options: Any) -> Any:
    """raw_client() for redis.asyncio (``max_connections`` goes to its pool)."""
    import redis.asyncio as aioredis

    from kickq import cluster

    options = {"decode_responses": True, **options}
    if cluster.is_cluster_url(url):
        return cluster.async_routed_client(url, namespace, options, reroute_timeout=10.0)
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(url, **options))


def side_key(namespace: str, label: str) -> str:
    """A fresh key for a test's own signalling (a handler pushes a pid, the test releases a job):
    tagged with the namespace, so on a cluster it lives on the namespace's master, where the
    test's ``r`` reads it; outside the namespace's own ``{ns}:`` prefix, so kickq never sees it."""
    return f"kqtest:{{{namespace}}}:{label}:{uuid.uuid4().hex[:8]}"


def any_key_client(url: str, **options: Any) -> Any:
    """A redis-py client (decode_responses=True) that reaches any key: for a cluster URL, redis-py's
    own RedisCluster (handlers use it for the keys a test hands them in a job's data)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    from kickq import cluster

    options = {"decode_responses": True, **options}
    if cluster.is_cluster_url(url):
        nodes, _ = cluster.parse_cluster_url(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options)
    return redis.Redis.from_url(url, **options)


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` (redis://, redis+cluster://...) with ``user:password@`` in place of its credentials."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest.rpartition('@')[2]}"
