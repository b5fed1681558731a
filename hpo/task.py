"""The user's code: model and data factories named as ``package.module:function``."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class TaskImportError(ValueError):
    pass


def importable_from(*directories: str) -> None:
    """Lets ``module:function`` paths resolve against these directories (the study file's folder,
    the working directory), as ``python -m`` would for a script beside them."""
    for directory in reversed(directories):
        directory = os.path.abspath(directory)
        if directory not in sys.path:
            sys.path.insert(0, directory)


def load_callable(path: str) -> Callable[..., Any]:
    """Imports ``package.module:function``; raises `TaskImportError` with one-line reasons."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise TaskImportError(f"{path!r} is not of the form package.module:function")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any error in user code at import time means the same thing here
        raise TaskImportError(f"cannot import {module_name} ({type(err).__name__}: {err})") from None
    except SystemExit as exit_:  # a script's own sys.exit() on import would end hpo without a word
        raise TaskImportError(f"cannot import {module_name} (it called sys.exit({exit_.code!r}) on import)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskImportError(f"{module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskImportError(f"{path} is not callable")
    return obj


# How hpo calls each of the task's functions: the argument lists it may call it with.
CALLS: dict[str, tuple[tuple[str, ...], ...]] = {
    "model": (("params",), ("params", "data")), "data": ((), ("params",)),
    "train_step": (("model", "batch"),), "eval_step": (("model", "batch"),),
}


def binds(fn: Callable[..., Any], n: int) -> bool | None:
    """Whether `fn` takes `n` positional arguments; None where it has no signature to read."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(n))
    except TypeError:
        return False
    return True


def call_problem(fn: Callable[..., Any], path: str, calls: tuple[tuple[str, ...], ...]) -> str | None:
    """Why hpo cannot call `fn` with any of the argument lists `calls` (every trial would fail
    with a TypeError), or None. hpo calls it with the longest list it takes (`binds`)."""
    if any(binds(fn, len(call)) is not False for call in calls):
        return None
    name = path.rpartition(":")[2]
    expected = " or ".join(f"{name}({', '.join(call)})" for call in calls)
    return f"{path} takes {inspect.signature(fn)} (expected a function called as {expected})"


def takes_params(fn: Callable[..., Any]) -> bool:
    """A data factory without parameters is called once per worker and its result reused."""
    return binds(fn, 1) is not False
