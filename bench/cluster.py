"""A Redis Cluster of masters on loopback for the bench's shards case, and what the case asks of it.

The runner starts it (``start_cluster``: redis-server --cluster-enabled yes per node, then
``redis-cli --cluster create``, no replicas) and stops it by pid; the driver finds its masters
(``masters``: CLUSTER SLOTS), one namespace whose slot each master owns (``pick_namespaces``: the
slot of every kickq key of namespace ns is CLUSTER KEYSLOT "{ns}", see kickq/keys.py), and checks
that a key of that namespace is served by that master without a redirection (``check_namespace``).
The cluster's URL is kickq's form ``redis+cluster://host:port,host:port,...``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEME = "redis+cluster://"
SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


@dataclass
class Cluster:
    host: str
    ports: list[int]
    procs: list[subprocess.Popen] = field(default_factory=list)
    workdir: Path | None = None
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return SCHEME + ",".join(f"{self.host}:{port}" for port in self.ports)

    @property
    def pids(self) -> set[int]:
        return {proc.pid for proc in self.procs}

    def stop(self, grace: float = 10.0) -> None:
        """TERM every node, KILL whichever is still running after grace, reap them all."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def parse_url(url: str) -> list[tuple[str, int]]:
    """(host, port) of each node of a redis+cluster:// URL."""
    if not url.startswith(SCHEME):
        raise ValueError(f"not a {SCHEME} URL: {url}")
    nodes = []
    for part in url[len(SCHEME):].split("/")[0].split(","):
        host, _, port = part.rpartition(":")
        nodes.append((host, int(port)))
    return nodes


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_node_port(host: str, taken: set[int]) -> int:
    """A port free a moment ago whose cluster bus port (+10000) was free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (port + BUS_OFFSET < 65536 and port not in taken and port + BUS_OFFSET not in taken
                and _port_free(host, port + BUS_OFFSET)):
            return port
    raise RuntimeError("no free port with a free cluster bus port")


def _binary(name: str) -> str:
    """redis-server or redis-cli: beside KICKQ_REDIS_SERVER when it is set (as in tests/helpers.py),
    else on PATH."""
    explicit = os.environ.get("KICKQ_REDIS_SERVER")
    if explicit:
        return str(Path(explicit).with_name(name)) if name != "redis-server" else explicit
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found on PATH")
    return found


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def start_cluster(workdir: Path, masters: int = 3, host: str = "127.0.0.1", timeout: float = 60.0) -> Cluster:
    """Start `masters` cluster nodes (no persistence), join them, wait for cluster_state:ok on each."""
    import redis
    started = time.monotonic()
    cluster = Cluster(host=host, ports=[], workdir=workdir)
    try:
        for _ in range(masters):
            port = free_node_port(host, {p for q in cluster.ports for p in (q, q + BUS_OFFSET)})
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            with open(node_dir / "redis.log", "ab") as log:
                cluster.procs.append(subprocess.Popen(
                    [_binary("redis-server"), "--port", str(port), "--bind", host, "--cluster-enabled", "yes",
                     "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "2000",
                     "--dir", str(node_dir), "--save", "", "--appendonly", "no", "--daemonize", "no"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=node_dir))
            cluster.ports.append(port)
        clients = [redis.Redis(host=host, port=port, socket_timeout=5) for port in cluster.ports]
        for port, client, proc in zip(cluster.ports, clients, cluster.procs, strict=True):
            def answers(client: Any = client, proc: subprocess.Popen = proc) -> bool:
                return proc.poll() is None and bool(client.ping())
            _wait(answers, 10, f"cluster node {port} to answer")
        create = subprocess.run(
            [_binary("redis-cli"), "--cluster", "create", *(f"{host}:{p}" for p in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create exited {create.returncode}: "
                               f"{(create.stdout + create.stderr)[-2000:]}")

        def every_node_ok() -> bool:
            for client in clients:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text or f"cluster_slots_ok:{SLOTS}" not in text:
                    return False
                if len(masters_of(client)) != masters:
                    return False
            return True
        _wait(every_node_ok, timeout, "cluster_state:ok on every node")
        for client in clients:
            client.close()
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_seconds = time.monotonic() - started
    return cluster


def masters_of(client: Any) -> list[dict[str, Any]]:
    """The masters one node knows, from its CLUSTER SLOTS: address, node id and slot ranges, in the
    order of their first slot."""
    by_address: dict[str, dict[str, Any]] = {}
    for entry in client.execute_command("CLUSTER", "SLOTS"):
        first, last, primary = int(entry[0]), int(entry[1]), entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        node_id = primary[2].decode() if isinstance(primary[2], bytes) else str(primary[2])
        address = f"{host}:{int(primary[1])}"
        master = by_address.setdefault(address, {"address": address, "id": node_id, "slots": []})
        master["slots"].append((first, last))
    out = sorted(by_address.values(), key=lambda m: min(a for a, _ in m["slots"]))
    for master in out:
        master["slots"].sort()
    return out


def owner(slot: int, masters: list[dict[str, Any]]) -> dict[str, Any]:
    for master in masters:
        if any(first <= slot <= last for first, last in master["slots"]):
            return master
    raise LookupError(f"slot {slot} has no master")


def pick_namespaces(keyslot: Callable[[str], int], masters: list[dict[str, Any]],
                    prefix: str = "bench-shard-", tries: int = 10_000) -> list[tuple[str, int]]:
    """(namespace, slot) for each master, in the masters' order: the first of prefix0, prefix1, ...
    whose slot that master owns."""
    chosen: dict[str, tuple[str, int]] = {}
    for i in range(tries):
        namespace = f"{prefix}{i}"
        slot = keyslot(namespace)
        address = owner(slot, masters)["address"]
        chosen.setdefault(address, (namespace, slot))
        if len(chosen) == len(masters):
            return [chosen[m["address"]] for m in masters]
    raise RuntimeError(f"no namespace for {len(masters) - len(chosen)} master(s) in {tries} tries")


def check_namespace(client: Any, namespace: str) -> None:
    """A key of the namespace is written and deleted on this master with no MOVED redirection."""
    key = "{" + namespace + "}:bench-probe"
    client.set(key, "1")
    client.delete(key)
