"""Strict TOML → frozen dataclass loading, shared by every component's config.

Unknown keys are errors that name the key and the table; nested dataclass fields are read from
sub-tables; lists become tuples.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], d: dict[str, Any] | None, where: str) -> T:
    d = dict(d or {})
    if not isinstance(d, dict):
        raise ValueError(f"[{where}]: expected a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"[{where}]: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            _check_scalar(hint, value, f"[{where}].{key}")
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"[{where}]: {e}") from None


_SCALARS = {bool: "a boolean (true / false)", int: "an integer", float: "a number", str: "a string"}


def _check_scalar(hint: Any, value: Any, where: str) -> None:
    """Refuse a TOML value of the wrong kind for a ``bool`` / ``int`` / ``float`` / ``str`` field
    (``"false"`` for a boolean reads as true in Python; ``"3"`` for a count fails later and
    obscurely). Ints are numbers; bools are not ints here. Other annotations are not checked."""
    if hint not in _SCALARS:
        return
    ok = (isinstance(value, bool) if hint is bool
          else isinstance(value, int) and not isinstance(value, bool) if hint is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float
          else isinstance(value, str))
    if not ok:
        raise ValueError(f"{where}: expected {_SCALARS[hint]}, got {value!r} ({type(value).__name__})")


_MISSING = object()


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def non_defaults(obj: Any) -> Any:
    """``obj`` as plain JSON-able data with every dataclass field that equals its declared default
    left out, recursively (through nested dataclasses, lists, tuples and dicts); fields without
    a default are always kept.

    What a value *means* does not change when a later version adds a key with a default, so a
    hash of this (``jobs.study_store.fingerprint``) stays the same for results that are still valid —
    where a hash of ``dataclasses.asdict`` would make every saved result stale.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            default = _field_default(f)
            if default is not _MISSING and _equal(value, default):
                continue
            out[f.name] = non_defaults(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [non_defaults(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): non_defaults(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors or arrays: compare what they print as
        return str(a) == str(b)
