"""Calling a handler in any of its styles and turning what happens into an Outcome.

Styles: `h(job, data)` returns the result or raises; `h(job, data, cb)` calls `cb()` / `cb(None)` for
success or `cb(err)` for failure (only the first call counts); `async def h(job, data)`; a returned
awaitable or concurrent.futures.Future is a promise. Handler errors are outcomes, never crashes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
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

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler
        self.callback_style = takes_callback(handler)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _await(self, awaitable: Any) -> Any:
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
