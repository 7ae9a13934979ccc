"""One table for the target item and the history (issue 17): an id-space table is declared once in
the unpooled collection, every feature on it is salted by the table's name, so the same raw id
reads the same row as a target and in the history — with and without managed collision. The
sharded twin, the checkpoint round trip and the exported program are checked in
``tests/distributed`` (``configs/tiny.toml`` shares its ``item`` table)."""

from __future__ import annotations

import copy
import tempfile
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embedding.hashing import name_salt
from embedding.modules import field_bag_configs, field_hasher, sequence_configs, sequence_hasher
from embedding.schema import FeatureSchema
from jobs.config import load_config
from model.ranking import ModelConfig, RankingModel
from model.sparse import _pool
from pipeline.collate import collate
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, generate

ROOT = Path(__file__).resolve().parents[2]
MANAGED = ["schema.tables.item.managed_collision=true"]


def _doc() -> dict:
    with open(ROOT / "configs/tiny.toml", "rb") as f:
        return tomllib.load(f)["schema"]


def _separate_doc() -> dict:
    """The wave-1 layout: the history on its own ``hist_item`` table."""
    d = copy.deepcopy(_doc())
    d["tables"]["hist_item"] = {"hash_size": 500, "dim": 16}
    d["sequences"][0]["features"][0]["table"] = "hist_item"
    return d


@pytest.fixture(scope="module")
def table():
    schema = load_config(ROOT / "configs/tiny.toml").schema
    root = Path(tempfile.mkdtemp())
    generate(schema, GeneratorConfig(seed=1, rows_per_day=64, files_per_day=1, num_users=50, num_items=40,
                                     num_categories=4), root, parse_days("2026-01-01"), log=lambda *_: None)
    return pq.read_table(next(root.glob("day=*/*.parquet")))


def test_id_space_tables_and_their_salts() -> None:
    shared = FeatureSchema.from_dict(_doc())
    assert shared.id_space_tables == ["item"]
    # fields sharing a table among themselves (ctx) keep per-field salts: not an id space
    assert shared.salt_names([("item_id", "item"), ("hist_item_id", "item"), ("ctx_0", "ctx_t0")]) == \
        ["item", "item", "ctx_0"]
    separate = FeatureSchema.from_dict(_separate_doc())
    assert separate.id_space_tables == []
    # one table config holds the field's and the history's feature names; no EBC config for it
    assert [c.feature_names for c in sequence_configs(shared) if c.name == "item"] == [["item_id", "hist_item_id"]]
    assert "item" not in {c.name for c in field_bag_configs(shared)}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20), st.booleans())
def test_same_raw_id_same_row_for_target_and_history(ids: list[int], managed: bool) -> None:
    schema = load_config(ROOT / "configs/tiny.toml", MANAGED if managed else []).schema
    fh, sh = field_hasher(schema), sequence_hasher(schema)
    n, others = len(ids), [k for k in schema.field_names if k != "item_id"]
    raw = torch.tensor(ids, dtype=torch.int64)

    def kjt(keys, key):
        lengths = torch.tensor([1 if k == key else 0 for k in keys for _ in range(n)], dtype=torch.int32)
        return KeyedJaggedTensor(keys=keys, values=raw, lengths=lengths)
    target = fh(kjt(schema.field_names, "item_id"))["item_id"].values()
    history = sh(kjt(schema.sequence_columns, "hist_item_id"))["hist_item_id"].values()
    assert torch.equal(target, history)
    # a field on a table of its own still gets its own salt: another row for the same raw id
    assert others and not torch.equal(fh(kjt(schema.field_names, "user_id"))["user_id"].values(), target) \
        or n == 1


@pytest.mark.parametrize("managed", [False, True], ids=["hashed", "managed_collision"])
def test_target_and_history_read_the_same_rows(managed: bool, table) -> None:
    schema = load_config(ROOT / "configs/tiny.toml", MANAGED if managed else []).schema
    batch = collate(table, schema)
    torch.manual_seed(0)
    model = RankingModel(schema, ModelConfig())
    model.train()
    model.sparse_arch(batch.fields, batch.sequences)  # managed: admits the ids
    model.eval()
    out = model.sparse_arch(batch.fields, batch.sequences)
    items, hist = table.column("item_id").to_pylist(), table.column("hist_item_id").to_pylist()
    fi, max_len = schema.field_names.index("item_id"), schema.sequences[0].max_len
    row_of = {item: r for r, item in enumerate(items)}
    matched = 0
    for r, h in enumerate(hist):
        for j, item in enumerate(h[-max_len:]):  # collate keeps the newest max_len
            if item in row_of:
                assert torch.equal(out.fields_BFD[row_of[item], fi], out.sequence_features[0]["item_id"][r, j])
                matched += 1
    assert matched > 100
    assert out.fields_BFD[:, fi].abs().sum() > 0  # not all miss rows
    # the wave-1 layout (separate tables) does not share: the same ids read different rows
    sep = RankingModel(FeatureSchema.from_dict(_separate_doc()), ModelConfig())
    o2 = sep.sparse_arch(batch.fields, batch.sequences)
    r, j = next((r, j) for r, h in enumerate(hist) for j, i in enumerate(h[-max_len:]) if i in row_of)
    assert not torch.equal(o2.fields_BFD[row_of[hist[r][-max_len:][j]], fi], o2.sequence_features[0]["item_id"][r, j])


def test_both_lookups_train_the_shared_table(table) -> None:
    schema = load_config(ROOT / "configs/tiny.toml").schema
    batch = collate(table, schema)
    model = RankingModel(schema, ModelConfig())
    weight = model.sparse_arch.ec.embeddings["item"].weight
    out = model.sparse_arch(batch.fields, batch.sequences)
    out.fields_BFD[:, schema.field_names.index("item_id")].sum().backward(retain_graph=True)
    from_target = weight.grad.clone()
    weight.grad = None
    out.sequence_features[0]["item_id"].sum().backward()
    from_history = weight.grad
    assert from_target.abs().sum() > 0 and from_history.abs().sum() > 0
    rows_t, rows_h = from_target.abs().sum(1) > 0, from_history.abs().sum(1) > 0
    assert (rows_t & rows_h).any()  # rows that both the targets and the histories read


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=8), st.sampled_from(["sum", "mean"]))
def test_pooling_an_unpooled_lookup_equals_the_ebc(lengths: list[int], pooling: str) -> None:
    """The id-space field's own pooling (``model.sparse._pool``) is what an EBC would compute."""
    torch.manual_seed(len(lengths))
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t", num_embeddings=50, embedding_dim=8, feature_names=["f"],
        pooling=PoolingType.SUM if pooling == "sum" else PoolingType.MEAN)])
    lens = torch.tensor(lengths, dtype=torch.int32)
    ids = torch.randint(0, 50, (int(lens.sum()),))
    expected = ebc(KeyedJaggedTensor(keys=["f"], values=ids, lengths=lens)).values()
    weight = ebc.embedding_bags["t"].weight
    got = _pool(JaggedTensor(values=weight[ids], lengths=lens), pooling, len(lengths))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_candidate_rows_pool_the_shared_field_without_a_history(table) -> None:
    """Candidate rows (no sequences) read the target from the id-space table like full rows."""
    schema = load_config(ROOT / "configs/tiny.toml", MANAGED).schema
    batch = collate(table, schema)
    model = RankingModel(schema, ModelConfig())
    model.sparse_arch(batch.fields, batch.sequences)  # admit
    model.eval()
    full = model.sparse_arch(batch.fields, batch.sequences).fields_BFD
    torch.testing.assert_close(model.sparse_arch.pooled_fields(batch.fields), full, rtol=0, atol=0)


def test_an_id_space_table_needs_one_raw_type() -> None:
    d = copy.deepcopy(_doc())
    d["sequences"][0]["features"][0]["raw_type"] = "string"  # hist_item_id as strings, item_id as int64
    with pytest.raises(ValueError, match=r"feature 'item_id': raw_type 'string' differs from 'int64' of 'item_id' "
                                         r"on the same table 'item'"):
        FeatureSchema.from_dict(d)


def test_tables_shared_only_by_sequences_keep_their_salts() -> None:
    """Two sequences on one table without a field (allowed before id spaces existed) hash as
    before: per column, so old checkpoints keep their rows."""
    d = _separate_doc()
    d["sequences"].append({"name": "buy", "max_len": 4, "features": [{"name": "item_id", "table": "hist_item"}]})
    schema = FeatureSchema.from_dict(d)
    assert schema.id_space_tables == []
    assert sequence_hasher(schema).salts.tolist() == [name_salt(c) for c in schema.sequence_columns]


def test_managed_admission_keeps_history_ids_after_a_small_first_batch(table) -> None:
    """TorchRec sizes the MCH admission buffer from the first batch; a first batch without
    histories then dropped later history ids. ``batch_rows`` sets the floor."""
    schema = load_config(ROOT / "configs/tiny.toml", MANAGED).schema
    full = collate(table, schema)
    empty_hist = table.set_column(table.column_names.index("hist_item_id"), "hist_item_id",
                                  pa.array([[] for _ in range(table.num_rows)], pa.list_(pa.int64())))
    empty_hist = empty_hist.set_column(empty_hist.column_names.index("hist_category"), "hist_category",
                                       pa.array([[] for _ in range(table.num_rows)], pa.list_(pa.int64())))
    misses = {}
    for rows in (0, table.num_rows):
        torch.manual_seed(0)
        model = RankingModel(schema, ModelConfig(), batch_rows=rows)
        arch = model.sparse_arch
        arch(*_inputs(collate(empty_hist, schema)))  # first step: targets only
        arch(*_inputs(full))  # second step: histories arrive, admitted at the next eviction
        arch(*_inputs(full))
        model.eval()
        for c in arch.mc_counts.values():
            c.zero_()
        arch(*_inputs(full))
        misses[rows] = int(arch.mc_counts["item"][3])  # history lookups that found no row
    assert misses[table.num_rows] == 0 < misses[0]  # TorchRec's sizing lost ids; the floor keeps them
    assert int(arch.mc_counts["item"][2]) > int(arch.mc_counts["item"][0]) > 0  # history and target counted apart


def _inputs(batch):
    return batch.fields, batch.sequences
