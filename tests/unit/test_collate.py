"""Collate equals a hand-built KeyedJaggedTensor on a small worked example."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.schema import FeatureSchema
from pipeline.collate import collate, collate_blocks, hash_strings, keep_newest
from pipeline.source import rebatch

SCHEMA = FeatureSchema.from_dict({
    "user_id": "uid", "user_id_type": "string", "labels": ["click", "like"],
    "tables": {"a": {"hash_size": 10, "dim": 4}, "t": {"hash_size": 10, "dim": 4},
               "hi": {"hash_size": 10, "dim": 4}, "hc": {"hash_size": 10, "dim": 4}},
    "sparse": [{"name": "a", "table": "a"}, {"name": "tags", "table": "t", "multi_valued": True},
               {"name": "s", "table": "a", "raw_type": "string"}],
    "dense": [{"name": "d0"}, {"name": "d1"}],
    "sequences": [{"name": "h", "max_len": 2, "features": [{"name": "item", "table": "hi"},
                                                          {"name": "cat", "table": "hc"}]}],
})

TABLE = pa.table({
    "uid": ["u1", "u2", "u1"],
    "ts": [1, 2, 3],
    "click": [1.0, 0.0, 1.0], "like": [0.0, 0.0, 1.0],
    "a": pa.array([7, -9, 2**62], pa.int64()),
    "tags": pa.array([[1, 2], [], [3]], pa.list_(pa.int64())),
    "s": ["x", "y", "x"],
    "d0": pa.array([0.5, 1.5, 2.5], pa.float32()), "d1": pa.array([1.0, 2.0, 3.0], pa.float32()),
    "h_item": pa.array([[10, 11, 12], [13], []], pa.list_(pa.int64())),
    "h_cat": pa.array([[20, 21, 22], [23], []], pa.list_(pa.int64())),
})


def test_collate_matches_hand_built_kjt() -> None:
    b = collate(TABLE, SCHEMA)
    sx, sy = hash_strings(pa.array(["x", "y"]))
    expected_fields = KeyedJaggedTensor(
        keys=["a", "tags", "s"],
        values=torch.tensor([7, -9, 2**62, 1, 2, 3, sx, sy, sx]),
        lengths=torch.tensor([1, 1, 1, 2, 0, 1, 1, 1, 1]),
    )
    expected_seq = KeyedJaggedTensor(  # max_len 2 keeps the newest two: [11, 12]
        keys=["h_item", "h_cat"],
        values=torch.tensor([11, 12, 13, 21, 22, 23]),
        lengths=torch.tensor([2, 1, 0, 2, 1, 0]),
    )
    for got, exp in ((b.fields, expected_fields), (b.sequences, expected_seq)):
        assert got.keys() == exp.keys()
        assert torch.equal(got.values(), exp.values())
        assert torch.equal(got.lengths(), exp.lengths())
    assert torch.equal(b.dense, torch.tensor([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]]))
    assert torch.equal(b.labels, torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    u1, u2 = hash_strings(pa.array(["u1", "u2"]))
    assert b.user_ids.tolist() == [u1, u2, u1]
    assert b.weights.tolist() == [1.0, 1.0, 1.0]


def test_padding_rows_have_zero_weight() -> None:
    b = collate(TABLE.slice(0, 2), SCHEMA, pad_to=5, padding_row=TABLE.slice(2, 1))
    assert b.size == 5 and b.weights.tolist() == [1, 1, 0, 0, 0]
    assert b.fields.stride() == 5
    with pytest.raises(ValueError, match="padding_row"):
        collate(TABLE.slice(0, 2), SCHEMA, pad_to=5)


def test_keep_newest() -> None:
    import numpy as np
    keep, lens = keep_newest(np.array([3, 1, 0, 4]), 2)
    assert lens.tolist() == [2, 1, 0, 2] and np.flatnonzero(keep).tolist() == [1, 2, 3, 6, 7]
    keep, lens = keep_newest(np.array([], dtype=np.int64), 2)  # an empty batch
    assert keep.tolist() == [] and lens.tolist() == []
    keep, lens = keep_newest(np.array([5, 2, 7]), 3)  # two cut rows, values 0..13
    assert np.flatnonzero(keep).tolist() == [2, 3, 4, 5, 6, 11, 12, 13] and lens.tolist() == [3, 2, 3]


def test_string_hash_is_stable_across_processes() -> None:
    # SipHash with pandas' fixed key: a literal value pins it
    assert hash_strings(pa.array(["tokenrec"]))[0] == -4273498841899581305
    assert hash_strings(["tokenrec"])[0] == -4273498841899581305


def test_collate_reads_slices_and_chunks_like_a_fresh_table() -> None:
    """Workers collate slices of Ray Data blocks (list offsets not starting at 0) and
    concatenations (several chunks per column): the result must equal a fresh copy's."""
    chunked = pa.concat_tables([TABLE, TABLE])  # two chunks per column
    for view in (chunked.slice(1, 4), chunked.slice(2, 3), TABLE.slice(1, 2)):
        fresh = pa.Table.from_pylist(view.to_pylist(), schema=view.schema)
        a, b = collate(view, SCHEMA), collate(fresh, SCHEMA)
        for kjt in ("fields", "sequences"):
            x, y = getattr(a, kjt), getattr(b, kjt)
            assert torch.equal(x.values(), y.values()) and torch.equal(x.lengths(), y.lengths())
        for t in ("dense", "labels", "user_ids", "weights"):
            assert torch.equal(getattr(a, t), getattr(b, t))



def test_int_fields_read_together_keep_key_order() -> None:
    """Single-valued int fields are read in one Arrow call; runs of them on either side of a
    list field must still land in schema key order."""
    schema = FeatureSchema.from_dict({
        "user_id": "a", "labels": ["click"], "tables": {"t": {"hash_size": 10, "dim": 4}},
        "sparse": [{"name": "a", "table": "t"}, {"name": "l", "table": "t", "multi_valued": True},
                   {"name": "b", "table": "t"}, {"name": "c", "table": "t"}],
    })
    t = pa.table({"ts": [1, 2], "click": pa.array([1.0, 0.0], pa.float32()),
                  "a": pa.array([1, 2], pa.int64()), "l": pa.array([[5], [6, 7]], pa.list_(pa.int64())),
                  "b": pa.array([3, 4], pa.int64()), "c": pa.array([8, 9], pa.int64())})
    f = collate(t, schema).fields
    assert f.keys() == ["a", "l", "b", "c"]
    assert f.values().tolist() == [1, 2, 5, 6, 7, 3, 4, 8, 9]
    assert f.lengths().tolist() == [1, 1, 1, 2, 1, 1, 1, 1]


def _same(a, b) -> None:
    for kjt in ("fields", "sequences"):
        x, y = getattr(a, kjt), getattr(b, kjt)
        assert x.keys() == y.keys() and x.stride() == y.stride()
        assert torch.equal(x.values(), y.values()) and torch.equal(x.lengths(), y.lengths())
    for t in ("dense", "labels", "user_ids", "weights"):
        assert torch.equal(getattr(a, t), getattr(b, t)), t


def test_collate_blocks_equals_collate_of_each_batch() -> None:
    """A worker decodes each block once and cuts its batches from it: every batch, including
    those joining two blocks' rows and the padded last one, must equal ``collate`` of the same
    rows, and the count of rows cut to ``max_len`` must match the rows' sequence lengths."""
    import numpy as np
    rng = np.random.default_rng(0)
    n = 61
    lens = rng.integers(0, 5, n)  # max_len 2: some rows cut, some not
    item = [list(rng.integers(0, 100, k)) for k in lens]
    big = pa.table({
        "uid": [f"u{i % 7}" for i in range(n)], "ts": list(range(n)),
        "click": rng.integers(0, 2, n).astype(float), "like": rng.integers(0, 2, n).astype(float),
        "a": pa.array(rng.integers(-2**40, 2**40, n), pa.int64()),
        "tags": pa.array([list(rng.integers(0, 9, k)) for k in rng.integers(0, 4, n)], pa.list_(pa.int64())),
        "s": [f"s{i % 5}" for i in range(n)],
        "d0": pa.array(rng.random(n), pa.float32()), "d1": pa.array(rng.random(n), pa.float32()),
        "h_item": pa.array(item, pa.list_(pa.int64())),
        "h_cat": pa.array([[x + 1000 for x in row] for row in item], pa.list_(pa.int64())),
    })
    cuts = [0, 3, 4, 4, 20, 21, 50, n]  # blocks of 3, 1, 0, 16, 1, 29 and 11 rows
    blocks = [big.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    pad = big.slice(0, 1)
    for size in (1, 5, 8, 64):
        got = list(collate_blocks(blocks, SCHEMA, size, padding_row=pad))
        want = list(rebatch(blocks, size))
        assert len(got) == len(want) == -(-n // size)
        for (b, over), t in zip(got, want):
            _same(b, collate(t, SCHEMA, pad_to=size, padding_row=pad))
            t_lens = np.array([len(x) for x in t.column("h_item").to_pylist()])
            assert over == int((t_lens > 2).sum())
    last, _ = list(collate_blocks(blocks, SCHEMA, 8))[-1]  # no padding row: a short last batch
    assert last.size == n % 8 and last.weights.tolist() == [1.0] * (n % 8)
