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
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"[{where}]: {e}") from None
