"""Generic typed conversion of raw YAML values into dataclasses: unknown keys, values checked
against (and converted to) each field's annotation, ``???`` values reported as missing. Every
problem is appended to a list, so that all of them are reported at once."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any

from molora.training.run_config.sections import MISSING

__all__ = ["find_missing", "to_dataclass", "typed_values", "unknown_keys"]


def to_dataclass(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]):
    """``cls(**raw)`` with each value checked and converted (see :func:`typed_values`).

    Args:
        cls: a dataclass.
        raw: its raw values.
        prefix: the dotted key of ``raw``, for the messages.
        problems: where problems are appended.

    Returns:
        The instance, or None when ``raw`` had a problem.
    """
    values = typed_values(cls, raw, prefix, problems)
    return None if values is None else cls(**values)


def typed_values(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any] | None:
    """Check ``raw``'s keys against ``cls``'s fields and each value against its annotation.

    Args:
        cls: a dataclass (a ``source`` field is not settable).
        raw: its raw values; ``???`` values are left out (reported by :func:`find_missing`).
        prefix: the dotted key of ``raw``, for the messages.
        problems: where problems are appended.

    Returns:
        ``{field: converted value}``, or None when ``raw`` had a problem.
    """
    if not isinstance(raw, dict):
        problems.append(f"'{prefix}' must be a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name != "source"]
    n_before = len(problems)
    unknown_keys(raw, names, prefix, problems)
    values = {}
    for key, value in raw.items():
        if key not in names or value == MISSING:
            continue
        ok, converted = _convert(value, hints[key])
        if ok:
            values[key] = converted
        else:
            problems.append(f"'{prefix}.{key}' must be {_describe(hints[key])}, got {value!r}")
    return values if len(problems) == n_before else None


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``hint``): ints widen to floats, numeric strings to numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _convert(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, value if isinstance(value, int) else float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, c = _convert(v, item)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is dict or origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))


def unknown_keys(raw: dict[str, Any], known: list[str], prefix: str, problems: list[str]) -> None:
    """Append a problem for each key of ``raw`` not in ``known``, naming the known keys."""
    for key in raw:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"unknown key '{dotted}'; known: {sorted(known)}")


def find_missing(raw: Any, prefix: str, problems: list[str]) -> None:
    """Append a problem for each ``???`` value anywhere in ``raw``, by dotted key."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            find_missing(value, f"{prefix}.{key}" if prefix else str(key), problems)
    elif raw == MISSING:
        problems.append(
            f"missing required value '{prefix}' (it is {MISSING!r} in the config): set it, e.g. {prefix}=..."
        )
