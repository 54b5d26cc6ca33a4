"""A pidfile that refuses a second supervisor and disappears on exit."""
from __future__ import annotations

import os


class PidfileError(Exception):
    pass


def create(path: str) -> None:
    try:
        with open(path) as f:
            old = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        old = 0
    if old and old != os.getpid():
        try:
            os.kill(old, 0)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise PidfileError(f"{path}: process {old} is running") from None
        else:
            raise PidfileError(f"{path}: process {old} is running") from None
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove(path: str) -> None:
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
    except (FileNotFoundError, ValueError):
        pass
