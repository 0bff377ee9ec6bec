"""Finding a user's function named ``module.function`` (reward functions, loss terms).

Configs name functions as axolotl does: the module is a ``.py`` file in one of
the search folders (the config's folder), or else an importable module (on
``sys.path``). Naming one runs its code: each file whose code runs is named in
one ``[INFO]`` line, once per process, however often it is named. Anything
wrong is one line naming the function, raised as the caller's error class, so
a typo fails before training.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Callable

from .progress import rank0_print

_MODULES: dict[Path, object] = {}  # resolved file -> module: each file runs once per process
_COUNTER = itertools.count()


def announce(label: str, source) -> None:
    """The ``[INFO]`` line naming a file whose code is about to run for ``label``."""
    rank0_print(f"[INFO] {label}: running the code of {source}")


def error_text(e: BaseException) -> str:
    """``Type: message`` on one line (the type alone when there is no message)."""
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _load_file(label: str, path: Path, error: type):
    """Import ``path`` under a unique name (files of the same name in different
    folders must not collide), with its folder on ``sys.path`` while it runs so
    it can import the modules beside it."""
    path = path.resolve()
    if path in _MODULES:
        return _MODULES[path]
    name = f"_mlx_dpo_user_{next(_COUNTER)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    announce(label, path)
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, SyntaxError):
            where = e.filename or path  # the module, or a sibling it imports
            raise error(f"{label}: {where} has a syntax error: {e.msg} (line {e.lineno})") from None
        if isinstance(e, Exception):
            raise error(f"{label}: importing {path} failed: {error_text(e)}") from e
        raise
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    _MODULES[path] = module
    return module


def _import(label: str, module_name: str, looked: list[str], error: type):
    """The importable module ``module_name``, or an error saying where we looked."""
    try:
        spec = None if module_name in sys.modules else importlib.util.find_spec(module_name)
        if spec is not None and spec.origin:  # not imported yet: its code runs now
            announce(label, spec.origin)
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        parts = module_name.split(".")
        if e.name in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            where = ", ".join(looked) if looked else "no folders"
            raise error(f"{label}: no module {module_name!r}: not a file ({where}) nor importable") from None
        raise error(f"{label}: importing {module_name!r} failed: {error_text(e)}") from e
    except SyntaxError as e:
        raise error(f"{label}: {e.filename} has a syntax error: {e.msg} (line {e.lineno})") from None
    except Exception as e:
        raise error(f"{label}: importing {module_name!r} failed: {error_text(e)}") from e


def find_function(entry: str, search_dirs: list, what: str, error: type, example: str) -> tuple[str, Callable]:
    """``(function name, function)`` for ``entry`` = ``module.function`` (``pkg.mod.fn``:
    ``<dir>/pkg/mod.py``), from the first of ``search_dirs`` holding the file, else imported.

    ``what`` ("reward function", "loss term") and ``example`` (a valid name) word the errors,
    which are raised as ``error``.
    """
    label = f"{what} {entry!r}"
    *module_parts, attr = entry.split(".")
    if not module_parts or not attr or not all(module_parts):
        raise error(f"{label}: not a valid name (write module.function, e.g. {example})")
    relative = Path(*module_parts).with_suffix(".py")
    looked, module, source = [], None, None
    for folder in search_dirs:
        candidate = (Path(folder).expanduser() / relative).absolute()
        looked.append(str(candidate))
        if candidate.is_file():
            module, source = _load_file(label, candidate, error), str(candidate.resolve())
            break
    if module is None:
        module_name = ".".join(module_parts)
        module, source = _import(label, module_name, looked, error), f"module {module_name!r}"
    if not hasattr(module, attr):
        defined = sorted(
            k for k, v in vars(module).items()
            if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        listed = f" (it defines: {', '.join(defined)})" if defined else ""
        raise error(f"{label}: {source} has no {attr!r}{listed}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise error(f"{label}: {attr!r} in {source} is a {type(fn).__name__}, not a function")
    return attr, fn
