"""Calling a handler in any of its styles and turning what happens into an Outcome.

Styles: `h(job, data)` returns the result or raises; `h(job, data, cb)` calls `cb()` / `cb(None)` for
success or `cb(err)` for failure (only the first call counts); `async def h(job, data)`; a returned
awaitable or concurrent.futures.Future is a promise. Handler errors are outcomes, never crashes.

`Runner` runs one job at a time; `Slots` runs several at once (a dense worker): async work as tasks
on one event loop in a thread of its own, everything else in a pool of threads.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

from kickq import payload


@dataclass(frozen=True)
class Outcome:
    success: bool
    result_json: str = ""  # success: the JSON of the return value ("" for None)
    error: str = ""  # failure: what went wrong, as text


def describe_error(err: Any) -> str:
    if isinstance(err, BaseException):
        text = str(err)
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    else:
        text = str(err)
    if not text.isascii():
        # Stored as UTF-8, which cannot hold a lone surrogate (an OSError about a file name read
        # with surrogateescape has them): written as \udcxx instead of failing the save.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def takes_callback(handler: Callable[..., Any]) -> bool:
    """True for `h(job, data, cb)`: three or more positional parameters (or *args)."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


class Runner:
    """Runs one handler, job after job, in one worker process (one event loop, made on first use)."""

    def __init__(self, handler: Callable[..., Any], awaiter: Callable[[Any], Any] | None = None) -> None:
        self.handler = handler
        self.callback_style = takes_callback(handler)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._awaiter = awaiter  # awaits on another thread's loop (a dense worker's), blocking this one

    def _await(self, awaitable: Any) -> Any:
        if self._awaiter is not None:
            return self._awaiter(awaitable)
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(_as_coroutine(awaitable))

    def run(self, job: Any, data: Any) -> Outcome:
        try:
            if self.callback_style:
                value = self._run_with_callback(job, data)
            else:
                value = self.handler(job, data)
                if inspect.isawaitable(value):
                    value = self._await(value)
                elif isinstance(value, concurrent.futures.Future):
                    value = value.result()
        except _Reported as reported:
            return Outcome(False, error=describe_error(reported.err))
        except BaseException as exc:  # noqa: B036 - a handler's SystemExit is its job's failure too
            if isinstance(exc, KeyboardInterrupt):
                raise
            return Outcome(False, error=describe_error(exc))
        return self._success(value)

    def _run_with_callback(self, job: Any, data: Any) -> Any:
        done = threading.Event()
        reported: list[Any] = []

        def cb(err: Any = None, *_ignored: Any) -> None:
            if not done.is_set():  # late or repeated calls are ignored
                reported.append(err)
                done.set()

        value = self.handler(job, data, cb)
        if inspect.isawaitable(value) and not done.is_set():
            self._await(value)  # an async handler that reports through cb
        done.wait()  # a handler that never reports is killed at its process_timeout by the master
        if reported[0] is not None:  # cb(err): anything but None is an error
            raise _Reported(reported[0])
        return None

    @staticmethod
    def _success(value: Any) -> Outcome:
        if value is None:
            return Outcome(True)
        try:
            return Outcome(True, result_json=payload.encode(value, what="handler result"))
        except Exception as exc:
            return Outcome(False, error=describe_error(exc))


class _Reported(Exception):
    """`cb(err)` from a callback-style handler."""

    def __init__(self, err: Any) -> None:
        super().__init__(describe_error(err))
        self.err = err


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


class Slots:
    """Runs up to `slots` jobs at once with one handler, each run's Outcome going to
    `on_end(key, outcome)` from the thread that ends it. An `async def` handler runs as a task on
    one event loop (a thread of its own); any other style runs in a pool of `slots` threads, and an
    awaitable it returns is handed to the loop, freeing its thread. A task can be cancelled (the
    handler sees CancelledError); a thread cannot."""

    def __init__(self, handler: Callable[..., Any], slots: int,
                 on_end: Callable[[str, Outcome], None]) -> None:
        self.runner = Runner(handler, awaiter=self._await_on_loop)
        self.on_end = on_end
        self.slots = slots
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._tasks: dict[str, asyncio.Task[Any]] = {}  # on the loop's thread only
        self._on_loop: set[str] = set()  # runs that are tasks (under _lock): they can be cancelled
        self._async = not self.runner.callback_style and _is_async(handler)

    def start(self, key: str, job: Any, data: Any) -> None:
        if self._async:
            try:
                awaitable = self.runner.handler(job, data)  # creates the coroutine: runs nothing
            except BaseException as exc:  # noqa: B036 - e.g. a TypeError: its job's failure
                self.on_end(key, Outcome(False, error=describe_error(exc)))
                return
            self._schedule(key, awaitable)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.slots, thread_name_prefix="kickq-job")
        self._pool.submit(self._in_thread, key, job, data)

    def cancel(self, key: str) -> bool:
        """Cancel the run `key` if it is a task (True); a thread cannot be (False)."""
        with self._lock:
            if key not in self._on_loop or self._loop is None:
                return False
            self._loop.call_soon_threadsafe(self._cancel_task, key)
            return True

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # --- threads --------------------------------------------------------------------------------------

    def _in_thread(self, key: str, job: Any, data: Any) -> None:
        outcome: Outcome | None
        try:
            if self.runner.callback_style:
                outcome = self.runner.run(job, data)
            else:
                outcome = self._call(key, job, data)
                if outcome is None:
                    return  # an awaitable, now a task on the loop: it ends there
        except BaseException as exc:  # noqa: B036 - every run must end, whatever happens
            outcome = Outcome(False, error=describe_error(exc))
        self.on_end(key, outcome)

    def _call(self, key: str, job: Any, data: Any) -> Outcome | None:
        try:
            value = self.runner.handler(job, data)
            if inspect.isawaitable(value):
                self._schedule(key, value)
                return None
            if isinstance(value, concurrent.futures.Future):
                value = value.result()
        except BaseException as exc:  # noqa: B036 - a handler's SystemExit is its job's failure too
            return Outcome(False, error=describe_error(exc))
        return Runner._success(value)

    # --- the event loop ---------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="kickq-loop", daemon=True).start()
                self._loop = loop
            return self._loop

    def _schedule(self, key: str, awaitable: Any) -> None:
        loop = self._ensure_loop()
        with self._lock:
            self._on_loop.add(key)
        loop.call_soon_threadsafe(self._create_task, key, awaitable)

    def _create_task(self, key: str, awaitable: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(_guarded(awaitable))
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._task_done, key))

    def _cancel_task(self, key: str) -> None:
        task = self._tasks.get(key)
        if task is not None:
            task.cancel()

    def _task_done(self, key: str, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(key, None)
        with self._lock:
            self._on_loop.discard(key)
        if task.cancelled():
            outcome = Outcome(False, error="CancelledError")
        else:
            ok, value = task.result()
            outcome = Runner._success(value) if ok else Outcome(False, error=describe_error(value))
        self.on_end(key, outcome)

    def _await_on_loop(self, awaitable: Any) -> Any:
        """A callback-style handler's awaitable, from its thread: awaited on the loop."""
        return asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), self._ensure_loop()).result()


def _is_async(handler: Callable[..., Any]) -> bool:
    """An `async def`: its coroutine goes to the loop at once. Anything else that returns an
    awaitable (an object with an async __call__, ...) gets there through a thread."""
    return inspect.iscoroutinefunction(handler)


async def _guarded(awaitable: Any) -> tuple[bool, Any]:
    """(True, value) or (False, exception): a handler's SystemExit or KeyboardInterrupt must not stop
    the loop; a CancelledError goes through (the task is then cancelled)."""
    try:
        return True, await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: B036
        return False, exc
