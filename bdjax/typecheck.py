"""Checking a value a user typed (``--set``, ``--attack-arg``, a sweep grid) against its field's type.

The CLI parses ``epochs=abc`` as the string ``'abc'``; without a check it fails far away
(``'<' not supported between 'str' and 'int'``). ``check_value`` compares the value with the
annotation of the config field or keyword it is meant for and names that field when they
disagree. It knows the annotations bdjax uses (int, float, bool, str, None, unions, tuples,
dicts, classes); anything else passes unchecked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing


def field_types(cls) -> dict[str, typing.Any]:
    """{field name: resolved annotation} of a dataclass (``{}`` where they cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something not importable here: check nothing
        return {}


def check_value(what: str, value, hint):
    """``value`` if it fits ``hint`` (a list given for a tuple comes back as a tuple), else ValueError.

    what: the field, for the message, e.g. ``FinetuneConfig.epochs``.
    """
    ok, converted = _fits(value, hint)
    if not ok:
        raise ValueError(f"{what} must be {describe(hint)}, got {value!r} ({type(value).__name__})")
    if isinstance(converted, float) and not math.isfinite(converted):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return converted


def describe(hint) -> str:
    """A short human name of a type annotation (``int``, ``float or None``, ``tuple of float``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        return f"tuple of {describe(args[0])}" if args else "tuple"
    if origin in (dict, list):
        return origin.__name__
    if hint is float:
        return "a number (float)"
    return getattr(hint, "__name__", str(hint))


def _fits(value, hint) -> tuple[bool, typing.Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or isinstance(hint, (str, typing.TypeVar)):
        return True, value
    if hint is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _fits(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, (str, os.PathLike)), os.fspath(value) if isinstance(value, os.PathLike) else value
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            element = args[0] if args else typing.Any
            checked = [_fits(v, element) for v in value]
        elif len(args) == len(value):
            checked = [_fits(v, a) for v, a in zip(value, args)]
        else:
            return False, value
        return all(ok for ok, _ in checked), tuple(v for _, v in checked)
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if hint is list or origin is list:
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict)), value  # a dict overrides fields of the default
    if isinstance(hint, type):
        try:
            return isinstance(value, hint), value
        except TypeError:
            return True, value
    return True, value  # Callable, protocols, ...: not checked
