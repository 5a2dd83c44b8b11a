"""Checks of the values that enter the public API: choices of ``Literal`` types and option dicts."""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from gmfx._errors import ParameterError, parameter

__all__ = ["check_choice", "check_options"]


def check_choice(value: Any, choices: Any, *, function: str, name: str, label: str | None = None) -> Any:
    """``value`` if it is one of the ``Literal`` type ``choices``, else a :class:`ParameterError`
    (``unknown <label> <value>``, ``label`` defaulting to ``name``)."""
    allowed = typing.get_args(choices)
    if isinstance(value, (str, type(None))) and value in allowed:
        return value
    return _refuse(f"unknown {label or name} {value!r}", [str(a) for a in allowed], value, function, name)


def check_options(options: Mapping[str, Any] | None, target: Callable[..., Any], *, function: str, name: str) -> dict[str, Any]:
    """``options`` as a dict, after checking that ``target`` takes every key as a keyword argument.

    Option dicts are checked where they enter (``run_preproc(filter={"lowpas": 4})`` fails at once,
    naming the key and the closest valid one), not as a ``TypeError`` deep inside a task graph.
    """
    options = dict(options or {})
    signature = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return options
    valid = [n for n, p in signature.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in options:
        if key not in valid:
            _refuse(f"{key!r} is not an option of {name}", valid, key, function, name)
    return options


def _refuse(what: str, valid: list[str], given: Any, function: str, name: str) -> typing.NoReturn:
    close = difflib.get_close_matches(str(given), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ParameterError(what, where=parameter(function, name), fix=f"{hint}use one of: {', '.join(valid)}")
