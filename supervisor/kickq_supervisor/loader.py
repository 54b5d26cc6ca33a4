"""Importing the user's handler modules: a dotted module name or a path to a .py file."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType


class HandlerImportError(Exception):
    def __init__(self, target: str, cause: BaseException) -> None:
        super().__init__(f"cannot import handler module {target!r}: {type(cause).__name__}: {cause}")
        self.target = target


def load(target: str) -> ModuleType:
    try:
        if target.endswith(".py") or os.sep in target:
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            name = "kickq_handlers_" + os.path.splitext(os.path.basename(path))[0]
            directory = os.path.dirname(path)
            if directory not in sys.path:
                sys.path.insert(0, directory)  # so the file can import its neighbours
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(target)
    except BaseException as exc:  # noqa: B036 - a SystemExit at import is a failed import too
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise HandlerImportError(target, exc) from exc
