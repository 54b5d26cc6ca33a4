"""The Lua scripts: loading, and the arguments and replies of each transition.

Argument builders and reply parsers are plain functions so that the sync and the asyncio client
share them; only `Scripts` (sync), its async twin and `load()` touch a connection. Every transition
takes `now` (epoch ms); None lets the script read Redis' own clock, so that every host agrees on time.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import redis

from .cluster import rerouted
from .config import JOB_OPTION_DEFAULTS
from .keys import Keys

#: Extra time past process_timeout before the reaper may recover a run: the supervisor that owns
#: the run kills it at process_timeout and ghosts it itself; the reaper is for lost supervisors.
LEASE_GRACE_MS = 1000
NAMES = ("create", "claim", "finish", "finish_many", "abandon", "recover", "promote", "purge", "delete",
         "schedule", "unschedule", "extend",
         "requeue", "purge_state",  # requeue on: admin only (the `kickq` command)
         "repair_inspect", "repair_orphan", "repair_index", "repair_state", "repair_counts")


_LUA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lua")


def _read(name: str) -> str:
    # A plain path, not importlib.resources: the latter trips over some editable installs.
    with open(os.path.join(_LUA_DIR, name + ".lua"), encoding="utf-8") as f:
        return f.read()


def lua_literal(value: Any) -> str:
    """A Lua expression for a JSON-like value (None becomes nil: an absent key)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for these
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(str(k))}] = {lua_literal(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)")
_HEADER = re.compile(r"\A--\[\[.*?\]\]\n", re.S)

#: The shared helpers, one file per concern (lua/_lib_<concern>.lua), in dependency order: a Lua
#: local is seen only by the lines after it, so each file uses only what the files before it and
#: its own earlier lines define.
LIB_FILES = ("_lib_core", "_lib_tally", "_lib_packed", "_lib_structures", "_lib_schedule", "_lib_run",
             "_lib_claim", "_lib_journal", "_lib_handoff")


def _lib_blocks() -> list[tuple[str | None, str]]:
    """The LIB_FILES in order, each cut at every top-level `local` (a helper or a constant): (name
    defined, text). A file's header, and any comment before its first definition, is a block of
    its own named None."""
    blocks: list[tuple[str | None, list[str]]] = []
    for file in LIB_FILES:
        text = (_read(file)
                .replace("__DEFAULTS__", lua_literal(JOB_OPTION_DEFAULTS))
                .replace("__LEASE_GRACE_MS__", str(LEASE_GRACE_MS)))
        header = _HEADER.match(text)
        if not header:
            raise RuntimeError(f"lua/{file}.lua must start with a --[[ ... ]] header")
        blocks.append((None, [header.group(0)]))
        for line in text[header.end():].splitlines(keepends=True):
            found = _DEFINITION.match(line)
            if found:
                blocks.append((found.group(1), []))
            elif blocks[-1][0] is None and line.strip() and not line.startswith("--"):
                raise RuntimeError(f"lua/{file}.lua has code before its first definition: {line!r}")
            blocks[-1][1].append(line)
    return [(name, "".join(lines)) for name, lines in blocks]


class _Lib:
    """The shared helpers' blocks, and which helpers each one uses: read once for all the scripts
    (every process that imports kickq builds the sources at import)."""

    def __init__(self) -> None:
        self.blocks = _lib_blocks()
        defined = {n for n, _ in self.blocks if n is not None}
        self.uses = {n: set(_IDENTIFIER.findall(text)) & defined for n, text in self.blocks if n is not None}

    def closure(self, names: Iterable[str]) -> set[str]:
        """The helpers `names` and all those they use, transitively."""
        needed: set[str] = set()
        todo = [n for n in names if n in self.uses]
        while todo:
            word = todo.pop()
            if word not in needed:
                needed.add(word)
                todo += [w for w in self.uses[word] if w not in needed]
        return needed

    def body(self, name: str) -> tuple[set[str], str]:
        """The helpers one script uses and its body, as a chunk that sees KEYS and ARGV."""
        body = _read(name)
        needed = self.closure(set(_IDENTIFIER.findall(body)))
        if "note" in needed:
            # Counts and stats noted during the call are written once, after the body (flush_notes),
            # also when the body fails midway: Redis keeps the writes done so far, and their counts.
            needed = self.closure([*needed, "flush_notes"])
            body = (f"local function transition()\n{body}\nend\n"
                    "local ok, reply = pcall(transition)\nflush_notes(ARGV[1])\n"
                    "if not ok then error(reply, 0) end\nreturn reply\n")
        return needed, body

    def source(self, name: str) -> str:
        """Full text of one script: the shared helpers it uses (Redis runs a script's top level at
        every call, so helpers it never calls would only cost), then the transition itself. Here
        and in the library the files' headers (comments for the reader of lua/) are left out."""
        needed, body = self.body(name)
        lib = "".join(text for n, text in self.blocks if n in needed)
        return lib + "\n" + body

    def library(self, names: Iterable[str], name: str, prefix: str) -> str:
        """Every script as one Redis function library (Redis 7): its top level, every helper
        included, runs once at load; function `prefix + script` runs one script per call."""
        lib = "".join(text for n, text in self.blocks if n is not None)
        if _RCALL_AT_LOAD not in lib:
            raise RuntimeError("_lib_core.lua must read redis.call in one line: " + _RCALL_AT_LOAD)
        parts = [f"#!lua name={name}\n", lib.replace(_RCALL_AT_LOAD, "local rcall\n", 1)]
        for script in names:
            flags = "" if script in ADDS_JOBS else "'allow-oom'"
            parts.append(f"\nlocal function script_{script}(KEYS, ARGV)\n{self.body(script)[1]}\nend\n"
                         f"redis.register_function{{function_name = '{prefix}{script}',\n"
                         f"  flags = {{{flags}}}, callback = function(keys, args)\n"
                         f"    begin_call()\n    return script_{script}(keys, args)\n  end}}\n")
        return "".join(parts)


#: Redis at maxmemory (noeviction) refuses these functions whole, before they write: they add jobs.
#: The others move, finish or remove jobs and run ('allow-oom'), so that work in flight drains (an
#: EVALSHA script is refused at its first write that may grow memory, which these mostly do late).
ADDS_JOBS = ("create", "schedule", "extend")

_RCALL_AT_LOAD = "local rcall = redis.call\n"

_LIB = _Lib()


def source(name: str) -> str:
    """Full text of one script (see _Lib.source)."""
    return _LIB.source(name)


SOURCES = {name: source(name) for name in NAMES}
SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in SOURCES.items()}

#: The library's name and its functions' carry a hash of the code: kickq versions that share a Redis
#: each call their own (a library is never replaced, so a running one is never changed under it).
_VERSION = hashlib.sha1("".join(SOURCES[n] for n in NAMES).encode()).hexdigest()[:12]
LIBRARY_NAME = f"kickq_{_VERSION}"
FUNCTIONS = {name: f"kickq_{_VERSION}_{name}" for name in NAMES}
LIBRARY = _LIB.library(NAMES, LIBRARY_NAME, f"kickq_{_VERSION}_")


#: The commands of load(): the function library, and every script for EVALSHA.
LOAD_LIBRARY = ("FUNCTION", "LOAD", LIBRARY)
LOAD_SCRIPTS = tuple(("SCRIPT", "LOAD", text) for text in SOURCES.values())


def load(client: Any, failed: BaseException | None = None) -> bool | None:
    """Load kickq's scripts into `client`'s Redis, after call `failed` (if any) said Redis lacks
    them. True: the function library is there (Redis 7 on). False: every script is loaded for
    EVALSHA, because Redis has no functions (6.x) or an ACL denies this user FUNCTION LOAD or FCALL.
    None: Redis is at maxmemory, which refuses FUNCTION LOAD but not SCRIPT LOAD: scripts are
    loaded, and the library is tried again at the next call. (kickq.aio.load: the same steps.)"""
    functions: bool | None = False
    if tries_library(failed):
        try:
            client.execute_command(*LOAD_LIBRARY)
            return True
        except redis.exceptions.ResponseError as exc:
            functions = library_refused(exc)
            if functions:
                return True
    for call in LOAD_SCRIPTS:
        client.execute_command(*call)
    return functions


def tries_library(failed: BaseException | None) -> bool:
    """Whether load() tries FUNCTION LOAD: not after a call this user was denied FCALL."""
    return failed is None or not _denied(failed, "fcall")


def library_refused(exc: redis.exceptions.ResponseError) -> bool | None:
    """What load() returns after Redis refused FUNCTION LOAD with `exc`: True (the library is
    there already), None (maxmemory) or False (no functions, or denied), the last two once the
    scripts are loaded. Any other refusal is raised."""
    if "already exists" in str(exc):
        return True
    if is_out_of_memory(exc):
        return None
    if "unknown command" in str(exc).lower() or _denied(exc, "function"):
        return False
    raise exc


def _denied(exc: BaseException, command: str) -> bool:
    """An ACL denied this user `command` (redis-py: "User u has no permissions to run the 'fcall'
    command")."""
    text = str(exc).lower()
    return "no permissions" in text and f"'{command}" in text


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis at maxmemory refused the command (redis-py drops the "OOM" of its reply's text)."""
    return isinstance(exc, redis.exceptions.ResponseError) and (
        isinstance(exc, _OUT_OF_MEMORY) or str(exc).startswith("OOM"))


_OUT_OF_MEMORY = getattr(redis.exceptions, "OutOfMemoryError", ())


def command(name: str, keys: Sequence[Any], args: Sequence[Any], functions: bool | None,
            retry: bool = False) -> tuple[Any, ...]:
    """The command that runs script `name`: FCALL of its function, or EVALSHA. `functions` is what
    load() said last; `retry`: the call is made again right after that load."""
    if functions or (functions is None and not retry):
        return ("FCALL", FUNCTIONS[name], len(keys), *keys, *args)
    return ("EVALSHA", SHAS[name], len(keys), *keys, *args)


def is_unloaded(exc: BaseException) -> bool:
    """Whether a call failed only because Redis does not hold the scripts (a restart, SCRIPT or
    FUNCTION FLUSH, another server behind the address): it did not run; load() and call again."""
    if isinstance(exc, redis.exceptions.NoScriptError):
        return True
    text = str(exc).lower()
    return isinstance(exc, redis.exceptions.ResponseError) and (
        text.startswith("function not found") or ("unknown command" in text and "fcall" in text)
        or _denied(exc, "fcall"))


def _now(now: int | None) -> str:
    return "" if now is None else str(int(now))


# --- argument builders: (keys, args) for each script --------------------------------------------

def create_args(keys: Keys, items: Sequence[tuple[str, str, str, int | None]],
                now: int | None = None) -> tuple[list[str], list[Any]]:
    """items: (name, data JSON or "", stored opts JSON or "", delay ms or None)."""
    args: list[Any] = [keys.prefix, _now(now), len(items)]
    for name, data, opts, delay_ms in items:
        args += [name, data, opts, "" if delay_ms is None else delay_ms, ""]
    return keys.script_keys, args


def claim_args(keys: Keys, names: Sequence[str], now: int | None = None,
               claimer: str = "", idle_ms: int = 0) -> tuple[list[str], list[Any]]:
    """idle_ms > 0 (with a claimer): found nothing, the caller is registered as idle that long."""
    return keys.script_keys, [keys.prefix, _now(now), claimer, int(idle_ms), *names]


def finish_args(keys: Keys, job_id: str, token: str, outcome: str, payload: str = "",
                claim_names: Sequence[str] = (), now: int | None = None,
                claimer: str = "", run_ms: int | None = None) -> tuple[list[str], list[Any]]:
    if outcome not in ("success", "fail", "ghost"):
        raise ValueError(f"outcome must be success, fail or ghost, not {outcome!r}")
    return keys.script_keys, [keys.prefix, _now(now), job_id, str(token), outcome, payload, claimer,
                       "" if run_ms is None else int(run_ms), *claim_names]


#: One finished run for finish_many / abandon: (id, token, outcome, payload, run ms, ms since it ended).
RunOutcome = tuple[str, str, str, str, int, int]


def _runs_args(runs: Sequence[RunOutcome]) -> list[Any]:
    args: list[Any] = [len(runs)]
    for job_id, token, outcome, payload, run_ms, ago_ms in runs:
        if outcome not in ("success", "fail", "ghost"):
            raise ValueError(f"outcome must be success, fail or ghost, not {outcome!r}")
        args += [job_id, str(token), outcome, payload, int(run_ms), int(ago_ms)]
    return args


def journal_entry(job_id: str, token: str, outcome: str, payload: str, run_ms: int,
                  ended_mono_ms: float) -> str:
    """One run for a worker's journal (apply_journal in lua/_lib_journal.lua): ended_mono_ms is the end on
    time.monotonic() in ms, which every process of one host shares."""
    token = str(token)
    if _PLAIN_WORD.match(job_id) and _PLAIN_WORD.match(token) and _PLAIN_WORD.match(outcome):
        # What json.dumps writes, a third of its cost: two entries go out per job (an outcome, the
        # next start), from the worker's hottest loop. Only words JSON writes as they are.
        text = '""' if not payload else json.dumps(payload)
        return f'["{job_id}", "{token}", "{outcome}", {text}, {int(run_ms)}, {round(ended_mono_ms, 3)!r}]'
    return json.dumps([job_id, token, outcome, payload, int(run_ms), round(ended_mono_ms, 3)])


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_:]+\Z")


def _mono(mono_ms: float | None) -> str:
    return "" if mono_ms is None else repr(round(mono_ms, 3))


def finish_many_args(keys: Keys, claimer: str, runs: Sequence[RunOutcome] = (),
                     give_back: Sequence[tuple[str, str]] = (), claim: int = 0,
                     claim_names: Sequence[str] = (), now: int | None = None,
                     mono_ms: float | None = None, idle_ms: int = 0) -> tuple[list[str], list[Any]]:
    if not claimer:
        raise ValueError("finish_many needs the caller's claimer id")
    args: list[Any] = [keys.prefix, _now(now), claimer, _mono(mono_ms), *_runs_args(runs), len(give_back)]
    for job_id, token in give_back:
        args += [job_id, str(token)]
    args += [claim if claim_names else 0, int(idle_ms), *claim_names]
    return keys.script_keys, args


def abandon_args(keys: Keys, claimer: str, error: str, runs: Sequence[RunOutcome] = (),
                 now: int | None = None, mono_ms: float | None = None) -> tuple[list[str], list[Any]]:
    return keys.script_keys, [keys.prefix, _now(now), claimer, error, _mono(mono_ms), *_runs_args(runs)]


def sweep_args(keys: Keys, limit: int, now: int | None = None, *extra: str) -> tuple[list[str], list[Any]]:
    return keys.script_keys, [keys.prefix, _now(now), limit, *extra]


def delete_args(keys: Keys, job_id: str) -> tuple[list[str], list[Any]]:
    return keys.script_keys, [keys.prefix, job_id]


def schedule_args(keys: Keys, schedule_id: str, record_json: str, ticks: Sequence[int] = (),
                  now: int | None = None) -> tuple[list[str], list[Any]]:
    return keys.script_keys, [keys.prefix, _now(now), schedule_id, record_json, *ticks]


def unschedule_args(keys: Keys, schedule_id: str) -> tuple[list[str], list[Any]]:
    return keys.script_keys, [keys.prefix, schedule_id]


def extend_args(keys: Keys, schedule_id: str, ticks: Sequence[int],
                now: int | None = None) -> tuple[list[str], list[Any]]:
    return keys.script_keys, [keys.prefix, _now(now), schedule_id, *ticks]


# --- reply parsers --------------------------------------------------------------------------------

def pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def parse_create(reply: Sequence[Any]) -> list[tuple[str, int]]:
    return [(str(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]


def parse_claim(reply: Any) -> tuple[str, str, dict[str, str]] | None:
    """(job id, attempt token, job hash) or None."""
    if not reply:
        return None
    return str(reply[0]), str(reply[1]), pairs(reply[2:])


def run_token(fields: Mapping[str, str]) -> str:
    """The attempt token of a job's current run, from its hash (run_token in lua/_lib_claim.lua): its
    attempt number and its create time, so that a job whose id Redis handed out again after losing
    the first one (a failover) never matches a token of the lost job's runs."""
    return f"{fields.get('attempt', '')}:{fields.get('create_time', '')}"


def parse_handoff(raw: str | bytes) -> tuple[str, str, dict[str, str]] | None:
    """An inbox entry (see hand_off in lua/_lib_handoff.lua): the claim made for the worker, as JSON."""
    try:
        reply = json.loads(raw)
        return parse_claim(reply) if isinstance(reply, list) and len(reply) >= 2 else None
    except ValueError:
        return None


def parse_finish(reply: Sequence[Any]) -> tuple[str, str, tuple[str, str, dict[str, str]] | None]:
    """(status, new state, next claim or None); status is ok | stale | missing."""
    return str(reply[0]), str(reply[1]), parse_claim(reply[2])


Claim = tuple[str, str, dict[str, str]]


def parse_finish_many(reply: Sequence[Any]
                      ) -> tuple[list[tuple[str, str]], list[Claim], list[tuple[str, str, str, str]]]:
    """((status, state after) per finished run, the jobs claimed, the journal's runs not saved as
    (id, token, status, state))."""
    statuses, states, claimed, rejected = reply
    return ([(str(status), str(state)) for status, state in zip(statuses, states, strict=True)],
            [c for c in (parse_claim(r) for r in claimed) if c is not None],
            [(str(i), str(t), str(st), str(sa)) for i, t, st, sa in rejected])


def parse_claim_record(record: str | None) -> list[tuple[str, str]]:
    """P.."claim:"..claimer: "id token id token ..." (one pair after a single claim)."""
    words = (record or "").split()
    return list(zip(words[0::2], words[1::2], strict=False))  # a torn pair is dropped


class Scripts:
    """The scripts, run on one redis-py client: as functions of kickq's library where Redis has
    them, else by EVALSHA; either is loaded again by itself when Redis lost it (a restart, a flush).
    With a `lane` (connection.Lane), single calls go through it rather than the client's
    execute_command. In a pipeline a script runs by EVALSHA (redis-py loads it first if need be)."""

    def __init__(self, client: Any, lane: Any = None) -> None:
        self._client = client
        self._scripts = {name: client.register_script(text) for name, text in SOURCES.items()}
        self._lane = lane
        # A namespace's client on a cluster (cluster.RoutedRedis) makes again what did not run;
        # calls through the lane bypass it, and are made again here.
        self._reroute_timeout: float | None = getattr(client, "reroute_timeout", None) if lane else None
        self.functions: bool | None = True  # what load() said last (see command())

    def run(self, name: str, keys_and_args: tuple[list[str], list[Any]], client: Any = None,
            meanwhile: Callable[[], Any] | None = None) -> Any:
        """One script call (queued, when `client` is a pipeline). `meanwhile()` (optional) runs
        while Redis works on it where the call goes through the lane, else before it is sent."""
        keys, args = keys_and_args
        if client is not None:
            if meanwhile is not None:
                meanwhile()
            return self._scripts[name](keys=keys, args=args, client=client)
        if self._reroute_timeout is None:
            return self._run(name, keys_and_args, meanwhile)
        pending = [meanwhile] if meanwhile is not None else []

        def once() -> None:  # the caller's work runs once, however many times the call is made
            if pending:
                pending.pop()()

        return rerouted(lambda: self._run(name, keys_and_args, once), self._reroute_timeout)

    def _run(self, name: str, keys_and_args: tuple[list[str], list[Any]],
             meanwhile: Callable[[], Any] | None) -> Any:
        keys, args = keys_and_args
        try:
            return self._execute(command(name, keys, args, self.functions), meanwhile)
        except redis.exceptions.ResponseError as exc:
            if not is_unloaded(exc):
                raise
            failed = exc
        return self.load_and_run(name, keys_and_args, failed)

    def load_and_run(self, name: str, keys_and_args: tuple[list[str], list[Any]],
                     failed: BaseException) -> Any:
        """Call `name` again once loaded, after call `failed` said Redis lacks the scripts (it
        did not run). Also for calls sent elsewhere (the worker's Channel)."""
        keys, args = keys_and_args
        self.functions = load(self._client, failed)
        return self._execute(command(name, keys, args, self.functions, retry=True), None)

    def _execute(self, call: tuple[Any, ...], meanwhile: Callable[[], Any] | None) -> Any:
        if self._lane is not None:
            return self._lane.execute(call, meanwhile)
        if meanwhile is not None:
            meanwhile()
        return self._client.execute_command(*call)

    # Convenience wrappers used by the supervisor, the reaper and tests (time moved by argument).
    def claim(self, keys: Keys, names: Iterable[str], now: int | None = None,
              claimer: str = "", idle_ms: int = 0) -> tuple[str, str, dict[str, str]] | None:
        return parse_claim(self.run("claim", claim_args(keys, list(names), now, claimer, idle_ms)))

    def finish(self, keys: Keys, job_id: str, token: str, outcome: str, payload: str = "",
               claim_names: Sequence[str] = (), now: int | None = None, claimer: str = "",
               run_ms: int | None = None) -> tuple[str, str, tuple[str, str, dict[str, str]] | None]:
        return parse_finish(self.run("finish", finish_args(keys, job_id, token, outcome, payload,
                                                           claim_names, now, claimer, run_ms)))

    def finish_many(self, keys: Keys, claimer: str, runs: Sequence[RunOutcome] = (),
                    give_back: Sequence[tuple[str, str]] = (), claim: int = 0,
                    claim_names: Sequence[str] = (), now: int | None = None, mono_ms: float | None = None,
                    idle_ms: int = 0
                    ) -> tuple[list[tuple[str, str]], list[Claim], list[tuple[str, str, str, str]]]:
        return parse_finish_many(self.run("finish_many", finish_many_args(
            keys, claimer, runs, give_back, claim, claim_names, now, mono_ms, idle_ms)))

    def abandon(self, keys: Keys, claimer: str, error: str, runs: Sequence[RunOutcome] = (),
                now: int | None = None, mono_ms: float | None = None) -> tuple[int, int, int]:
        call = abandon_args(keys, claimer, error, runs, now, mono_ms)
        saved, given_back, ghosted = self.run("abandon", call)
        return int(saved), int(given_back), int(ghosted)

    def promote(self, keys: Keys, now: int | None = None, limit: int = 500) -> tuple[int, int, int]:
        count, next_due, at = self.run("promote", sweep_args(keys, limit, now))
        return int(count), int(next_due), int(at)

    def recover(self, keys: Keys, now: int | None = None, limit: int = 500,
                error: str = "lease expired: its worker or supervisor was lost") -> tuple[int, int]:
        count, next_lease = self.run("recover", sweep_args(keys, limit, now, error))
        return int(count), int(next_lease)

    def purge(self, keys: Keys, now: int | None = None, limit: int = 500) -> tuple[int, int]:
        count, next_purge = self.run("purge", sweep_args(keys, limit, now))
        return int(count), int(next_purge)

    def delete(self, keys: Keys, job_id: str) -> bool:
        return bool(self.run("delete", delete_args(keys, job_id)))
