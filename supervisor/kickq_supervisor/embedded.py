"""--embedded-redis DIR: a private redis-server owned by the supervisor, with AOF in DIR."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from .osapi import die_with_parent


class EmbeddedRedisError(Exception):
    pass


def find_binary() -> str:
    path = os.environ.get("KICKQ_REDIS_SERVER") or shutil.which("redis-server")
    if not path:
        raise EmbeddedRedisError("--embedded-redis needs a redis-server binary on PATH "
                                 "(Debian: apt-get install redis-server) or in KICKQ_REDIS_SERVER")
    return path


def start(directory: str, timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on a unix socket in `directory`; returns (process, redis url)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    sock = os.path.join(directory, "redis.sock")
    args = [find_binary(), "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
            "--dir", directory, "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", os.path.join(directory, "redis.log")]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    url = "unix://" + sock
    deadline = time.monotonic() + timeout
    import redis
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedRedisError(f"redis-server exited with code {proc.returncode}; "
                                     f"see {directory}/redis.log")
        try:
            if os.path.exists(sock) and redis.Redis.from_url(url, socket_timeout=1).ping():
                return proc, url
        except redis.exceptions.RedisError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise EmbeddedRedisError(f"redis-server did not answer on {sock} within {timeout:g}s")


def stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
