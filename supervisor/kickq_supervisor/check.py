"""`kickq-supervisor --check [options] MODULE...`: validate a deployment without running it.

Imports the handler modules (as the supervisor does at start), validates every registration and
the settings each one resolves to (config cascade: the modules' kickq.config() < the registering
client's overrides < the command-line flags), connects to every Redis the registrations use,
checks its version and mode, and what the connected ACL user may run in each namespace; then
prints what the supervisor would run and exits 0, or prints every problem found and exits 1.

Nothing is written to Redis. The ACL check asks `ACL DRYRUN` (Redis >= 7.0, and a user allowed to
run it) about each command kickq sends or its scripts run; where the server cannot tell, it probes
the script commands with calls that cannot write (EVALSHA of a script that does not exist, SCRIPT
LOAD of one that does not compile, EXISTS): a refused probe is logged in Redis' ACL LOG, as any
refused command is.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import redis

import kickq
from kickq import acks, registry
from kickq.config import resolve_job_options, validate_settings
from kickq.connection import (check_mode, check_version, client_scope, connect, describe, parse_version,
                              redis_url, server_info)
from kickq.keys import Keys

from . import loader

EXIT_OK = 0
EXIT_PROBLEMS = 1
PREFIX = "kickq-supervisor --check"

#: (command, whether kickq cannot work without it, what is lost without it). `K` is a key of the
#: namespace, `C` one of its pub/sub channels. The commands of the Lua scripts (kickq/lua), then
#: those the clients, workers and reaper send themselves.
_SCRIPT_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("HSET", "K", "f", "v"), ("HDEL", "K", "f"), ("HINCRBY", "K", "f", "1"), ("HGET", "K", "f"),
    ("HMGET", "K", "f"), ("HGETALL", "K"), ("HEXISTS", "K", "f"), ("ZADD", "K", "1", "m"),
    ("ZREM", "K", "m"), ("ZRANGE", "K", "0", "-1"), ("ZRANGEBYSCORE", "K", "0", "1"),
    ("ZREMRANGEBYSCORE", "K", "0", "1"), ("ZSCORE", "K", "m"), ("ZCARD", "K"), ("RPUSH", "K", "v"),
    ("LPUSH", "K", "v"), ("LPOP", "K"), ("LREM", "K", "0", "v"), ("LTRIM", "K", "0", "-1"),
    ("LLEN", "K"), ("LRANGE", "K", "0", "-1"), ("DEL", "K"), ("EXISTS", "K"), ("GET", "K"),
    ("SET", "K", "v"), ("INCR", "K"), ("EXPIRE", "K", "1"), ("PEXPIRE", "K", "1"),
    ("XADD", "K", "*", "f", "v"), ("SADD", "K", "m"), ("TIME",),
)
_CLIENT_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("EVALSHA", "0" * 40, "1", "K"), ("SCRIPT", "LOAD", "return 1"), ("BLPOP", "K", "1"),
    ("XREAD", "STREAMS", "K", "0"), ("XREVRANGE", "K", "+", "-"), ("PING",), ("HELLO",),
)
#: Refused, these cost a fallback, not the service: (command, what happens without it).
_OPTIONAL: dict[str, str] = {
    "INFO": "the version is read from HELLO instead",
    "FCALL": "scripts run by EVALSHA instead (a little slower)",
    "FUNCTION": "scripts run by EVALSHA instead (a little slower)",
    "ROLE": "wait_replicas gets no failover fence (kickq logs it once)",
}
_NO_SCRIPT = "0" * 40
#: Registrations whose settings differ only in other keys share one check of their Redis.
SERVER_SETTINGS = ("redis_password", "redis_options", "redis_timeout", "wait_replicas",
                   "wait_replicas_timeout", "wait_aof")


class Checker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.secrets: set[str] = set()

    def say(self, line: str) -> None:
        self.lines.append(line)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    # --- the command line ---------------------------------------------------------------------------

    def cli_settings(self) -> dict[str, Any]:
        """The flags that override the config, as the supervisor applies them."""
        from .cli import flag_settings  # cli imports this module when --check is given
        try:
            return validate_settings(flag_settings(self.args))
        except kickq.ConfigError as exc:
            self.problem(f"command line: {exc}")
            return {}

    def check_flags(self) -> None:
        args = self.args
        if args.max_jobs_per_worker < 0:
            self.problem(f"--max-jobs-per-worker must be 0 (never) or more, not {args.max_jobs_per_worker}")
        for flag, value, least in (("--kill-grace", args.kill_grace, 0.0),
                                   ("--reaper-interval", args.reaper_interval, None)):
            if not math.isfinite(value) or value < 0 or (least is None and value == 0):
                self.problem(f"{flag} must be a number of seconds{' above 0' if least is None else ''}, "
                             f"not {value:g}")
        if args.metrics_port is not None:
            try:
                from . import metrics  # noqa: F401 - prometheus-client is an optional extra
            except ImportError as exc:
                self.problem(f"--metrics-port: {exc}")
        if args.embedded_redis:
            from .embedded import EmbeddedRedisError, find_binary
            try:
                find_binary()
            except EmbeddedRedisError as exc:
                self.problem(str(exc))
        if args.pidfile:
            directory = os.path.dirname(os.path.abspath(args.pidfile))
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                self.problem(f"--pidfile {args.pidfile}: cannot create a file in {directory}")

    # --- modules and registrations ------------------------------------------------------------------

    def import_modules(self) -> None:
        for target in self.args.modules:
            try:
                loader.load(target)
            except loader.HandlerImportError as exc:
                self.problem(str(exc))

    def resolve(self, registration: registry.Registration, cli_settings: Mapping[str, Any],
                number: int) -> dict[str, Any] | None:
        """The registration's settings, validated as a whole; None if they cannot be used."""
        from .cli import settings_for
        label = f"registration {number} ({', '.join(registration.names) or '?'})"
        found = len(self.problems)
        for key, (_, largest) in registry.PROCESS_OPTIONS.items():
            value = getattr(registration, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
                self.problem(f"{label}: {key} must be an int from 1 to {largest}, got {value!r}")
        if not callable(registration.handler):
            self.problem(f"{label}: the handler is not callable: {registration.handler!r}")
        try:
            settings = settings_for(registration, dict(cli_settings))
        except Exception as exc:  # noqa: BLE001 - whatever the cascade raises is the problem to show
            self.problem(f"{label}: its settings cannot be merged: {type(exc).__name__}: {exc}")
            return None
        for key, value in settings.items():
            try:
                validate_settings({key: value})
            except kickq.ConfigError as exc:
                self.problem(f"{label}: {exc}")
        self.note_secrets(settings)
        if len(self.problems) > found:
            return None
        try:
            acks.wanted(settings)
        except kickq.ConfigError as exc:
            self.problem(f"{label}: {exc}")
        for name in registration.names:
            try:
                resolve_job_options(settings, name, None)
            except Exception as exc:  # noqa: BLE001 - e.g. a callable retry_interval that raises
                self.problem(f"{label}: the options of job {name!r} do not resolve: "
                             f"{type(exc).__name__}: {exc}")
        return settings if len(self.problems) == found else None

    def note_secrets(self, settings: Mapping[str, Any]) -> None:
        """Passwords that must never be printed: the setting, and any in the URL."""
        if settings.get("redis_password"):
            self.secrets.add(str(settings["redis_password"]))
        url = redis_url(settings) or ""
        userinfo = url.partition("://")[2].rpartition("@")[0]
        if userinfo:
            self.secrets.add(userinfo.partition(":")[2] or userinfo)
        for match in re.finditer(r"password=([^&;]+)", url):
            self.secrets.add(match.group(1))
        options = settings.get("redis_options") or {}
        for key in ("password", "sentinel_kwargs"):
            value = options.get(key)
            if isinstance(value, str) and value:
                self.secrets.add(value)

    # --- Redis --------------------------------------------------------------------------------------

    def check_redis(self, settings: Mapping[str, Any], namespaces: Iterable[str]) -> None:
        where = describe(settings)
        if self.args.embedded_redis:
            self.say(f"Redis: a private redis-server in {self.args.embedded_redis} "
                     "(--embedded-redis; not started by --check)")
            return
        try:
            client = connect(settings)
        except Exception as exc:  # noqa: BLE001 - a URL redis-py cannot use, a Sentinel that is down...
            self.problem(f"Redis at {where}: cannot connect: {type(exc).__name__}: {exc}")
            return
        try:
            info = server_info(client)
            check_version(info)
            check_mode(info, settings)
            wanted = acks.wanted(settings)
            if wanted is not None:
                acks.check_server(wanted, info, where)
            mode = info.get("redis_mode", "INFO refused: version from HELLO")
            user = self.whoami(client)
            self.say(f"Redis at {where}: Redis {info.get('redis_version')} ({mode}), user {user or '?'}")
            for namespace in sorted(set(namespaces)):
                self.check_acl(client, settings, info, namespace, user)
        except redis.exceptions.AuthenticationError as exc:
            self.problem(f"Redis at {where} refused the credentials: {exc}")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                kickq.RedisUnavailable) as exc:
            self.problem(f"Redis at {where} is unreachable: {exc}")
        except redis.exceptions.NoPermissionError as exc:
            self.problem(f"Redis at {where}: this user may run neither INFO nor HELLO: {exc}")
        except redis.exceptions.ResponseError as exc:
            self.problem(f"Redis at {where} refused: {exc}")
        except kickq.KickqError as exc:  # RedisVersionError, RedisModeError, ConfigError (wait_aof)
            self.problem(str(exc))
        finally:
            client.close()

    @staticmethod
    def whoami(client: redis.Redis) -> str | None:
        try:
            return str(client.execute_command("ACL", "WHOAMI"))
        except redis.exceptions.ResponseError:
            return None

    def commands(self, settings: Mapping[str, Any], info: Mapping[str, Any],
                 namespace: str) -> list[tuple[str, ...]]:
        """Each command kickq needs in `namespace`, with a key and channel of it."""
        keys = Keys(namespace)
        key, channel = keys.prefix + "check", keys.done
        seven = parse_version(str(info.get("redis_version", "0"))) >= (7, 0, 0)
        wanted = acks.wanted(settings)
        out = [*_SCRIPT_COMMANDS, *_CLIENT_COMMANDS,
               ("SPUBLISH" if seven else "PUBLISH", "C", "m"), ("SSUBSCRIBE" if seven else "SUBSCRIBE", "C"),
               ("INFO",)]
        if seven:
            out += [("FCALL", "kickq_check", "1", "K"), ("FUNCTION", "LOAD", "#!lua name=kickq_check\n")]
        if wanted is not None:
            out += [wanted.command(), ("ROLE",)]
        return [tuple(key if part == "K" else channel if part == "C" else str(part) for part in command)
                for command in out]

    def check_acl(self, client: redis.Redis, settings: Mapping[str, Any], info: Mapping[str, Any],
                  namespace: str, user: str | None) -> None:
        commands = self.commands(settings, info, namespace)
        where = f"Redis at {describe(settings)}, namespace {namespace}"
        cannot = None
        if user is None:
            cannot = "ACL WHOAMI refused"
        else:
            try:
                client.execute_command("ACL", "DRYRUN", user, "PING")
            except redis.exceptions.ResponseError as exc:
                cannot = f"ACL DRYRUN refused ({exc}; it needs Redis >= 7.0 and a user allowed to run it)"
        if cannot is None:
            assert user is not None
            denied = []
            for command in commands:
                reply = client.execute_command("ACL", "DRYRUN", user, *command)
                if str(reply) != "OK":
                    denied.append((command, str(reply)))
            self.acl_verdict(where, user, denied, f"all {len(commands)} commands kickq runs are allowed")
            return
        denied = []
        for command, expected in probes(info, Keys(namespace).prefix + "check"):
            try:
                client.execute_command(*command)
            except redis.exceptions.NoPermissionError as exc:
                denied.append((command, str(exc)))
            except redis.exceptions.ResponseError as exc:
                if not expected(exc):
                    denied.append((command, str(exc)))
        names = ", ".join(sorted({command_name(command) for command, _ in probes(info, "-")}))
        self.say(f"  ACL ({where}): cannot check ACL on this server: {cannot}; probed {names} only "
                 "(the commands the scripts run are not checked)")
        self.acl_verdict(where, user or "?", denied, "the probed commands are allowed")

    def acl_verdict(self, where: str, user: str, denied: Sequence[tuple[tuple[str, ...], str]],
                    ok: str) -> None:
        required = [(c, why) for c, why in denied if c[0] not in _OPTIONAL]
        for command, _why in denied:
            if command[0] in _OPTIONAL:
                self.say(f"  note: {where}: user {user} may not run {command_name(command)}: "
                         f"{_OPTIONAL[command[0]]}")
        for command, why in required:
            self.problem(f"{where}: user {user} may not run {command_name(command)}: {why}")
        if not required:
            self.say(f"  ACL ({where}): {ok}")

    # --- the whole check ----------------------------------------------------------------------------

    def run(self) -> int:
        self.check_flags()
        cli_settings = self.cli_settings()
        self.note_secrets(cli_settings)
        self.import_modules()
        registrations = registry.registrations()
        if not registrations and not self.problems:
            self.problem(f"no handlers registered by {' '.join(self.args.modules)} "
                         "(call Kickq().process(names, handler) at import)")
        resolved = [(reg, self.resolve(reg, cli_settings, number))
                    for number, reg in enumerate(registrations, 1)]
        usable = [(reg, settings) for reg, settings in resolved if settings is not None]
        for number, (reg, settings) in enumerate(resolved, 1):
            if settings is None:
                continue
            self.say(f"registration {number}: {', '.join(reg.names)}: {reg.concurrent_jobs} worker(s) x "
                     f"{reg.jobs_per_worker} job(s) at once = {reg.slots} job slot(s); namespace "
                     f"{settings['redis_namespace']}; Redis {describe(settings)}; handler "
                     f"{getattr(reg.handler, '__module__', '?')}.{getattr(reg.handler, '__qualname__', '?')}")
        servers: dict[tuple[Any, ...], tuple[Mapping[str, Any], set[str]]] = {}
        for _, settings in usable:
            identity = (describe(settings), *(repr(settings[key]) for key in SERVER_SETTINGS))
            servers.setdefault(identity, (settings, set()))[1].add(settings["redis_namespace"])
        for server, namespaces in servers.values():
            self.check_redis(server, namespaces)
        if usable:
            scopes = {client_scope(s) for _, s in usable}
            reapers = ("none (--no-reaper)" if self.args.no_reaper
                       else f"{len(scopes)} ({', '.join(sorted(scopes))})")
            workers = sum(reg.concurrent_jobs for reg, _ in usable)
            slots = sum(reg.slots for reg, _ in usable)
            self.say(f"would run {workers} worker(s), {slots} job slot(s); reaper(s): {reapers}; "
                     f"prefetch {self.args.prefetch}, kill grace {self.args.kill_grace:g}s")
        self.emit()
        return EXIT_PROBLEMS if self.problems else EXIT_OK

    def hide(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def emit(self) -> None:
        print(f"{PREFIX}: kickq {kickq.__version__}, modules {' '.join(self.args.modules)}")
        for line in self.lines:
            print(self.hide(line))
        if self.problems:
            for problem in self.problems:
                print(self.hide(f"{PREFIX}: problem: {problem}"), file=sys.stderr)
            print(f"{PREFIX}: {len(self.problems)} problem(s) found", file=sys.stderr)
        else:
            print(f"{PREFIX}: OK")
        sys.stdout.flush()


def command_name(command: Sequence[str]) -> str:
    """EVALSHA, SCRIPT LOAD, ...: a command as ACL rules name it."""
    name = " ".join(command[:2]) if command[0] in ("SCRIPT", "FUNCTION", "ACL") else command[0]
    keys = [part for part in command[1:] if part.startswith("{")]
    return f"{name} on {keys[0]}" if keys else name


def probes(info: Mapping[str, Any], key: str) -> list[tuple[tuple[str, ...], Callable[[Exception], bool]]]:
    """Calls that test a permission as the connected user and cannot write: each with the error
    that means "allowed"."""
    def says(text: str) -> Callable[[Exception], bool]:
        return lambda exc: text in str(exc).lower()
    out: list[tuple[tuple[str, ...], Callable[[Exception], bool]]] = [
        (("EVALSHA", _NO_SCRIPT, "1", key), says("no matching script")),
        (("SCRIPT", "LOAD", "return ("), says("compil")),
        (("EXISTS", key), says("\0")),
    ]
    if parse_version(str(info.get("redis_version", "0"))) >= (7, 0, 0):
        out.append((("FCALL", "kickq_check_missing", "1", key), says("not found")))
    return out


def run(args: argparse.Namespace) -> int:
    """The --check: 0 when the supervisor could start as configured, 1 with each problem printed."""
    return Checker(args).run()
