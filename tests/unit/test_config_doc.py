"""docs/config.md is generated from the typed configs (``jobs.config_doc``): it must match what
the code would write today, and every key must have a meaning written beside it in the source."""

from __future__ import annotations

import dataclasses

from jobs.config_doc import OUT, field_comments, render, sections, undocumented


def test_the_reference_is_up_to_date() -> None:
    assert OUT.read_text() == render(), "docs/config.md is out of date: run `python -m jobs.config_doc`"


def test_every_key_has_a_meaning() -> None:
    assert undocumented() == []


def test_every_section_and_key_is_listed() -> None:
    text = render()
    for name, cls in sections():
        assert f"## `[{name}]`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{name}.{f.name}"
    assert "## `[train.optim]`" in text and "## `[model.tokenformer]`" in text


def test_comments_are_read_from_beside_or_above_the_field() -> None:
    @dataclasses.dataclass
    class Example:
        a: int = 1  # beside a
        # above b,
        # two lines
        b: int = 2
        c: str = "x"  # beside c,
                      # continued (aligned under it)
        d: int = 0

    assert field_comments(Example) == {"a": "beside a", "b": "above b, two lines",
                                       "c": "beside c, continued (aligned under it)", "d": ""}
