"""Schema: generators expand, validation names the offending key, every shipped config loads."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from embedding.schema import FeatureSchema, load_schema
from jobs.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _doc() -> dict:
    with open(ROOT / "configs/tiny.toml", "rb") as f:
        return tomllib.load(f)["schema"]


def test_group_generator_expands_thousands_of_fields_onto_few_tables() -> None:
    d = _doc()
    d["sparse_groups"] = [{"prefix": "f", "count": 5000, "num_tables": 50, "hash_size": 1000, "dim": 16}]
    s = FeatureSchema.from_dict(d)
    names = [f.name for f in s.sparse if f.name.startswith("f_")]
    assert len(names) == 5000 and names[0] == "f_0" and names[-1] == "f_4999"
    assert len({f.table for f in s.sparse if f.name.startswith("f_")}) == 50
    assert s.table("f_t49").hash_size == 1000


def test_round_trip_through_to_dict() -> None:
    s = load_schema(ROOT / "configs/demo.toml")
    assert FeatureSchema.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["sparse"].append({"name": "item_id", "table": "item"}), "duplicate column name 'item_id'"),
        (lambda d: d["sparse"].append({"name": "x", "table": "nope"}), "unknown table 'nope'"),
        (lambda d: d["sparse"][0].update(colour="red"), "unknown key(s) ['colour']"),
        (lambda d: d.update(extra=1), "unknown key(s) ['extra']"),
        (lambda d: d["tables"].update(wide={"hash_size": 10, "dim": 32})
         or d["sparse"].append({"name": "w", "table": "wide", "group": "item"}),
         "dim mismatch in token group 'item'"),
        (lambda d: d["tables"].update(hist_category={"hash_size": 10, "dim": 32}), "dim mismatch"),
        (lambda d: d["sparse"][3].update(pooling="max"), "pooling: must be one of"),
        (lambda d: d["sparse_groups"][0].update(num_tables=99), "num_tables: must be in [1, count=4]"),
        (lambda d: d.pop("labels"), "'labels' is required"),
    ],
)
def test_validation_names_the_offending_key(mutate, message: str) -> None:
    d = copy.deepcopy(_doc())
    mutate(d)
    with pytest.raises(ValueError) as e:
        FeatureSchema.from_dict(d)
    assert message in str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.schema.sparse and cfg.schema.labels


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    text = (ROOT / "configs/tiny.toml").read_text().replace("[train]", "[train]\nbatchsize = 3")
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ValueError, match=r"\[train\]: unknown key\(s\) \['batchsize'\]"):
        load_config(tmp_path / "c.toml")


def test_overrides_apply_and_are_checked() -> None:
    cfg = load_config(ROOT / "configs/tiny.toml", ["model.use_sequences=false", "train.batch_size=64"])
    assert cfg.model.use_sequences is False and cfg.train.batch_size == 64
    with pytest.raises(ValueError, match="unknown key"):
        load_config(ROOT / "configs/tiny.toml", ["model.nope=1"])
