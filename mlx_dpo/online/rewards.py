"""Reward functions for online methods (GRPO): finding the user's, and calling them.

A reward function scores a whole batch at once, the TRL convention::

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

``prompts`` and ``completions`` hold strings (or message lists for
conversational prompts), ``completion_ids`` the token ids of each completion,
and every other dataset field comes as a keyword argument, one value per
completion. ``None`` means "no opinion" on that completion (it is scored NaN).

Configs name functions as axolotl does: ``module.function``, the module being
a ``.py`` file beside the config, or else an
importable module; a name without a dot is a built-in. Anything wrong is one
``RewardError`` line naming the function, so a typo fails before training.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .._platform.user_code import error_text as _error_text
from .._platform.user_code import find_function


class RewardError(Exception):
    """A reward function that cannot be found, loaded or used; one line naming it."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------- built-ins


def completion_length(completion_ids, **kwargs) -> list[float]:
    """Reward = number of completion tokens, ``len(completion_ids[i])``.

    Give it a negative weight to penalise length (or a positive one to reward it).
    """
    return [float(len(ids)) for ids in completion_ids]


def soft_overlong_reward(lengths, max_completion_length: int, overlong_buffer: int) -> list[float]:
    """DAPO's soft over-long punishment (Yu et al. 2025, "DAPO", eq. 13).

    With ``L_max = max_completion_length``, ``L_cache = overlong_buffer`` and
    ``L`` the completion's length in tokens::

        0                              if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
        -1                             if L > L_max

    The penalty grows linearly over the last ``L_cache`` tokens before the
    limit, so the model learns to finish before it is cut off.
    """
    start = max_completion_length - overlong_buffer
    out = []
    for n in lengths:
        if n <= start:
            out.append(0.0)
        elif n <= max_completion_length:
            out.append((start - n) / overlong_buffer)
        else:
            out.append(-1.0)
    return out


def _soft_overlong(entry: str, options: dict) -> Callable:
    limit, buffer = options.get("max_completion_length"), options.get("overlong_buffer")
    for key, value in (("max_completion_length", limit), ("overlong_buffer", buffer)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise RewardError(f"reward function {entry!r} needs {key} as a positive integer, got {value!r}")
    if buffer > limit:
        raise RewardError(
            f"reward function {entry!r}: overlong_buffer ({buffer}) must not exceed max_completion_length ({limit})"
        )

    def soft_overlong(completion_ids, **kwargs) -> list[float]:
        return soft_overlong_reward([len(ids) for ids in completion_ids], limit, buffer)

    soft_overlong.__doc__ = soft_overlong_reward.__doc__
    return soft_overlong


# name -> factory(entry, options) returning the function
BUILTINS: dict[str, Callable[[str, dict], Callable]] = {
    "completion_length": lambda entry, options: completion_length,
    "soft_overlong": _soft_overlong,
}


# ----------------------------------------------------------------- loading


def _resolve(entry: str, search_dirs: list, options: dict) -> tuple[str, Callable]:
    if "." not in entry:
        if entry not in BUILTINS:
            raise RewardError(
                f"reward function {entry!r}: no built-in of that name (built-ins: {', '.join(BUILTINS)}); "
                "a function in a file is written module.function, e.g. rewards.my_reward"
            )
        return entry, BUILTINS[entry](entry, options)
    return find_function(entry, search_dirs, "reward function", RewardError, "rewards.my_reward")


def load_reward_funcs(
    names: list, search_dirs: list, options: Optional[dict] = None
) -> list[tuple[str, Callable]]:
    """``(name, function)`` for each entry of ``names``, in order.

    An entry is a callable (named by its ``__name__``), a built-in name
    (``completion_length``, ``soft_overlong``) or ``module.function``:
    ``<dir>/module.py`` (``pkg.mod.fn``: ``<dir>/pkg/mod.py``) in the first of
    ``search_dirs`` that has it (the config's folder, then the working
    directory), else ``importlib.import_module("module")``. A file runs once
    per process however often it is named. ``options`` feeds the built-ins
    (``max_completion_length``, ``overlong_buffer`` for ``soft_overlong``).
    Names are the function names, as TRL logs them; where two entries share
    one, the entries as written name them (then ``_2``, ``_3`` for repeats).
    """
    options = dict(options or {})
    dirs = list(dict.fromkeys(Path(d) for d in search_dirs if d is not None))
    if isinstance(names, (str, bytes)) or callable(names):
        names = [names]
    resolved = []  # (entry as written, name, fn)
    for entry in names:
        if callable(entry):
            name = getattr(entry, "__name__", None) or type(entry).__name__
            resolved.append((name, name, entry))
        elif isinstance(entry, str) and entry.strip():
            entry = entry.strip()
            resolved.append((entry, *_resolve(entry, dirs, options)))
        else:
            raise RewardError(f"reward function {entry!r}: expected module.function, a built-in name or a callable")
    counts: dict[str, int] = {}
    for _, name, _ in resolved:
        counts[name] = counts.get(name, 0) + 1
    out, taken = [], set()
    for entry, name, fn in resolved:
        base = entry if counts[name] > 1 else name
        name, k = base, 2
        while name in taken:  # the same entry twice, or callables sharing a name
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out.append((name, fn))
    return out


# ----------------------------------------------------------------- scoring


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_float(name: str, i: int, value) -> float:
    """One reward as a float: None is NaN (no opinion); bools count 1 or 0 (a
    correctness check often returns them); strings and other objects are refused."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            raise RewardError(
                f"reward function {name!r} returned {x} at index {i}; rewards must be finite (None means no opinion)"
            )
        return x
    raise RewardError(
        f"reward function {name!r} returned a {type(value).__name__} at index {i} ({_short(value)}); "
        "rewards must be numbers or None"
    )


def score_completions(
    funcs: list[tuple[str, Callable]],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: Optional[dict[str, list]] = None,
) -> np.ndarray:
    """Rewards ``(N, F)`` float64: column f holds function f's scores of the N completions.

    Each function is called once for the whole batch as
    ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` (a
    column holds one value per completion), so batched scorers stay fast.
    ``None`` becomes NaN; weighting and advantages are the caller's.
    """
    n = len(completions)
    columns = dict(columns or {})
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(completion_ids)} completion_ids differ")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    out = np.empty((n, len(funcs)), dtype=np.float64)
    for f, (name, fn) in enumerate(funcs):
        try:
            result = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise RewardError(f"reward function {name!r} raised {_error_text(e)}") from e
        if isinstance(result, np.ndarray):
            if result.ndim != 1:
                raise RewardError(f"reward function {name!r} returned an array of shape {result.shape}; expected ({n},)")
            result = result.tolist()
        elif not isinstance(result, (list, tuple)):
            raise RewardError(
                f"reward function {name!r} returned a {type(result).__name__}; expected a list of {n} numbers"
            )
        if len(result) != n:
            raise RewardError(f"reward function {name!r} returned {len(result)} rewards for {n} completions")
        out[:, f] = [_as_float(name, i, v) for i, v in enumerate(result)]
    return out
