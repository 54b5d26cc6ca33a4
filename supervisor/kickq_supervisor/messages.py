"""What a worker tells its master through the pipe: one line per message, one codec for both ends.

    S <job id> <attempt token> <start, monotonic s> <process_timeout s> <job name>
    F <job id> [<success|fail> <run seconds> [<outcome payload as a JSON string>]]
    F <job id> ghost <run seconds> "<reason>"

S: a run starts now; the master's deadline for it is start + process_timeout (monotonic clocks
are shared by every process of a host). The name goes last because it may hold spaces.
F: the handler returned. With the outcome, the master counts the run (metrics); with the payload
(short ones only: RETAINED_PAYLOAD in worker_core.py), it can save the outcome itself should the
worker die before Redis has it. A dense worker (jobs_per_worker > 1) that ended a run itself as a
ghost (it cancelled the job at its process_timeout) says so with the outcome "ghost" and the reason
as the payload. Job ids and tokens never hold spaces (Redis INCR; "attempt:create time").
"""
from __future__ import annotations

import json
from typing import NamedTuple, Union


class Started(NamedTuple):
    job_id: str
    token: str
    started: float  # time.monotonic() of the worker's host
    timeout: float  # process_timeout, seconds
    name: str = ""


class Finished(NamedTuple):
    job_id: str
    outcome: str | None = None  # success | fail | ghost
    seconds: float | None = None  # the handler's run time
    payload: str | None = None  # the result JSON or the error text (a ghost's reason), when short enough


Message = Union[Started, Finished]


def encode(message: Message) -> str:
    """One line, without its newline."""
    if isinstance(message, Started):
        return (f"S {message.job_id} {message.token} {message.started:.6f} {message.timeout} "
                f"{message.name}")
    line = f"F {message.job_id}"
    if message.outcome is not None and message.seconds is not None:
        line += f" {message.outcome} {message.seconds:.6f}"
        if message.payload is not None:
            line += " " + json.dumps(message.payload)
    return line


def encode_lines(messages: tuple[Message, ...] | list[Message]) -> bytes:
    """Messages as one write: each line ends with a newline."""
    return ("\n".join([encode(m) for m in messages]) + "\n").encode()


def decode(line: str) -> Message | None:
    """The message of one line, or None for a line that is not one (it is ignored)."""
    parts = line.split(" ", 5) if line.startswith("S ") else line.split(" ", 4)
    try:
        if parts[0] == "S" and len(parts) >= 5:
            return Started(parts[1], parts[2], float(parts[3]), float(parts[4]),
                           parts[5] if len(parts) > 5 else "")
        if parts[0] == "F" and len(parts) >= 2 and parts[1]:
            if len(parts) < 4:
                return Finished(parts[1])
            return Finished(parts[1], parts[2], float(parts[3]),
                            _payload(parts[4]) if len(parts) == 5 else None)
    except ValueError:
        return None
    return None


def _payload(text: str) -> str | None:
    try:
        decoded = json.loads(text)
    except ValueError:
        return None
    return decoded if isinstance(decoded, str) else None
