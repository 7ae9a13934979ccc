"""Every scalar key of every job-config table refuses a TOML value of the wrong kind, naming the
key (``embedding.typed_config``): ``"false"`` for a boolean would read as true, ``"3"`` for a count
would fail later and obscurely."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.config import config_from_doc, set_dotted
from jobs.config_doc import sections

ROOT = Path(__file__).resolve().parents[2]
SCALARS = (bool, int, float, str)
KEYS = [(f"{table}.{f.name}", typing.get_type_hints(cls)[f.name])
        for table, cls in sections() for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] in SCALARS]
WRONG = {
    bool: st.one_of(st.sampled_from(["false", "False", "true", "no", "0"]), st.integers(), st.floats(allow_nan=False)),
    int: st.one_of(st.text(max_size=5), st.booleans(), st.floats(allow_nan=False)),
    float: st.one_of(st.text(max_size=5), st.booleans()),
    str: st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False)),
}


def test_there_are_scalar_keys_of_every_kind() -> None:
    assert {hint for _, hint in KEYS} == set(SCALARS) and len(KEYS) > 50


@pytest.mark.parametrize(("key", "hint"), KEYS, ids=[k for k, _ in KEYS])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_a_wrong_kind_is_refused_naming_the_key(key: str, hint: type, data) -> None:
    with open(ROOT / "configs/tiny.toml", "rb") as f:
        doc = tomllib.load(f)
    value = data.draw(WRONG[hint])
    set_dotted(doc, key, value)
    table, leaf = key.rsplit(".", 1)
    with pytest.raises(ValueError, match=rf"\[{table}\]\.{leaf}: expected"):
        config_from_doc(doc, "tiny.toml")
