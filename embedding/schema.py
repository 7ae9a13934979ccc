"""Feature schema: what every column of the logs is, and which embedding table serves it.

The schema is the contract between the Parquet logs (``pipeline/``), the TorchRec tables
(``embedding/``) and the towers (``model/``). It is written in TOML and read with
``FeatureSchema.from_dict`` / ``load_schema``. Thousands of fields are declared by generators
(``[[schema.sparse_groups]]`` with a ``count``), never by hand::

    [schema]
    user_id = "user_id"          # column used for GAUC; may also be a sparse field
    labels = ["click"]

    [schema.tables]
    user = { hash_size = 100000, dim = 16 }

    [[schema.sparse]]            # one field, its own or a shared table
    name = "user_id"
    table = "user"

    [[schema.sparse_groups]]     # ctx_0 .. ctx_999 sharing 20 tables ctx_t0 .. ctx_t19
    prefix = "ctx"
    count = 1000
    num_tables = 20
    hash_size = 5000
    dim = 16

    [[schema.sequences]]         # aligned list columns hist_item_id, hist_category, newest last
    name = "hist"
    max_len = 50
    features = [{ name = "item_id", table = "hist_item" }, { name = "category", table = "hist_cat" }]

Fields that share a table are salted by their name when ids are hashed (``embedding.hashing``),
so ``ctx_1 = 7`` and ``ctx_2 = 7`` land on different rows.

A table may serve a target field and sequence features at once (``item_id`` and ``hist_item_id``
on one ``item`` table, as in DIN, SASRec and HSTU): such a table is one *id space*
(``FeatureSchema.id_space_tables``), every feature on it is salted by the table's name (and must
have the same ``raw_type``), so the same raw id reads the same row as a target and in the
history. Its field is looked up through
the unpooled collection and pooled there (``model.sparse.SparseArch``)::

    [schema.tables]
    item = { hash_size = 20000, dim = 16, managed_collision = true }
    [[schema.sparse]]
    name = "item_id"
    table = "item"
    [[schema.sequences]]
    name = "hist"
    max_len = 32
    features = [{ name = "item_id", table = "item" }, { name = "category", table = "hist_cat" }]
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAW_TYPES = ("int64", "string")
POOLINGS = ("sum", "mean")
EVICTION_POLICIES = ("distance_lfu", "lfu", "lru")


@dataclass(frozen=True, kw_only=True)
class TableSpec:
    """``managed_collision``: rows are managed by TorchRec's MCH module (zero-collision hashing,
    ids admitted while training, evicted by ``eviction_policy`` when the table is full, every
    ``eviction_interval`` training steps) instead of ``hash(id) % hash_size``. Field tables go
    into a managed-collision EBC, tables serving sequence features into a managed-collision EC."""

    name: str
    hash_size: int
    dim: int
    managed_collision: bool = False
    eviction_policy: str = "distance_lfu"
    eviction_interval: int = 1


@dataclass(frozen=True, kw_only=True)
class SparseField:
    name: str
    table: str
    multi_valued: bool = False
    raw_type: str = "int64"
    pooling: str = "sum"
    group: str = "default"  # token group: fields of one group become one field token in grouped towers
    id_range: tuple[int, int] | None = None  # int ids outside [lo, hi] are quarantined; None: any id

    def __post_init__(self) -> None:
        if isinstance(self.id_range, list):  # from TOML / JSON
            object.__setattr__(self, "id_range", tuple(self.id_range))


def _sparse_dict(f: SparseField) -> dict[str, Any]:
    """``asdict`` of a field, ``id_range`` left out when unset (a list when set)."""
    d = dataclasses.asdict(f)
    if d["id_range"] is None:
        del d["id_range"]
    else:
        d["id_range"] = list(d["id_range"])
    return d


@dataclass(frozen=True, kw_only=True)
class DenseField:
    name: str
    # candidate-level: differs between the candidates of one request (the candidate's price, its
    # predicted quality, …). Default request-level: shared by every candidate of a request, so it
    # belongs to the user prefix that shared-prefix scoring computes once (docs/serving.md).
    candidate: bool = False


def _dense_dict(f: DenseField) -> dict[str, Any]:
    """``asdict`` of a dense field, ``candidate`` left out when false (fingerprints unchanged)."""
    return {"name": f.name} | ({"candidate": True} if f.candidate else {})


@dataclass(frozen=True, kw_only=True)
class SequenceFeature:
    name: str  # short name; the column is f"{sequence}_{name}"
    table: str
    raw_type: str = "int64"


@dataclass(frozen=True, kw_only=True)
class SequenceSpec:
    name: str
    max_len: int
    features: tuple[SequenceFeature, ...]

    def column(self, feature: SequenceFeature) -> str:
        return f"{self.name}_{feature.name}"

    @property
    def columns(self) -> list[str]:
        return [self.column(f) for f in self.features]


@dataclass(frozen=True, kw_only=True)
class FeatureSchema:
    labels: tuple[str, ...]
    tables: tuple[TableSpec, ...]
    sparse: tuple[SparseField, ...] = ()
    dense: tuple[DenseField, ...] = ()
    sequences: tuple[SequenceSpec, ...] = ()
    user_id: str = "user_id"
    user_id_type: str = "int64"
    ts: str = "ts"

    def __post_init__(self) -> None:
        _validate(self)

    # ---- lookups -------------------------------------------------------------------------
    def table(self, name: str) -> TableSpec:
        return self._tables_by_name[name]

    @property
    def _tables_by_name(self) -> dict[str, TableSpec]:
        return {t.name: t for t in self.tables}

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def candidate_columns(self, target_groups: tuple[str, ...]) -> list[str]:
        """Columns that differ between the candidates of one request: the sparse fields of the
        target token groups and the candidate-level dense fields. Every other column (user and
        context fields, request-level dense, sequences, the user id) is request-level."""
        return ([f.name for f in self.sparse if f.group in target_groups]
                + [f.name for f in self.dense if f.candidate])

    @property
    def sequence_columns(self) -> list[str]:
        return [c for s in self.sequences for c in s.columns]

    @property
    def field_tables(self) -> list[TableSpec]:
        """Tables used by sparse fields, in first-use order."""
        names = dict.fromkeys(f.table for f in self.sparse)
        return [self.table(n) for n in names]

    @property
    def sequence_tables(self) -> list[TableSpec]:
        """Tables used by sequence features (including id-space tables), in first-use order."""
        names = dict.fromkeys(f.table for s in self.sequences for f in s.features)
        return [self.table(n) for n in names]

    @property
    def id_space_tables(self) -> list[str]:
        """Tables that serve a sparse field *and* a sequence feature (the target item and the
        history on one table): one id space, salted by the table's name when hashed, so the same
        raw id maps to the same row for every feature on it. Their fields are looked up through
        the unpooled collection (``embedding.modules.sequence_configs``). Tables shared only by
        fields, or only by sequence features, keep per-feature salts."""
        fields = {f.table for f in self.sparse}
        return [t.name for t in self.sequence_tables if t.name in fields]

    def salt_names(self, features: list[tuple[str, str]]) -> list[str]:
        """The salt name of each ``(feature or column name, table)``: the table's name for
        id-space tables, the feature's own name otherwise."""
        shared = set(self.id_space_tables)
        return [table if table in shared else name for name, table in features]

    def fingerprint(self) -> str:
        """A stable hash of the schema (used to cache sharding plans and tag runs)."""
        d = dataclasses.asdict(self)
        d["sparse"] = type(d["sparse"])(_sparse_dict(f) for f in self.sparse)  # unset id_range left out
        d["dense"] = type(d["dense"])(_dense_dict(f) for f in self.dense)  # request-level left out
        return hashlib.sha256(repr(d).encode()).hexdigest()[:16]

    def without_sequences(self) -> FeatureSchema:
        used = {f.table for f in self.sparse}
        return dataclasses.replace(
            self, sequences=(), tables=tuple(t for t in self.tables if t.name in used)
        )

    # ---- TOML ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fully expanded schema in the input format (``from_dict(to_dict())`` round-trips)."""
        return {
            "user_id": self.user_id, "user_id_type": self.user_id_type, "ts": self.ts,
            "labels": list(self.labels),
            "tables": {t.name: {"hash_size": t.hash_size, "dim": t.dim}
                       | ({"managed_collision": True, "eviction_policy": t.eviction_policy,
                           "eviction_interval": t.eviction_interval} if t.managed_collision else {})
                       for t in self.tables},
            "sparse": [_sparse_dict(f) for f in self.sparse],
            "dense": [_dense_dict(f) for f in self.dense],
            "sequences": [{"name": q.name, "max_len": q.max_len,
                           "features": [dataclasses.asdict(f) for f in q.features]}
                          for q in self.sequences],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        d = dict(d)
        _check_keys(
            "schema",
            d,
            {
                "user_id", "user_id_type", "ts", "labels", "tables", "sparse",
                "sparse_groups", "dense", "dense_groups", "sequences",
            },
        )
        tables = [
            TableSpec(name=name, **_only("schema.tables." + name, spec, _names(TableSpec) - {"name"}))
            for name, spec in d.get("tables", {}).items()
        ]
        sparse = [SparseField(**_only(f"schema.sparse[{i}]", s, _names(SparseField)))
                  for i, s in enumerate(d.get("sparse", []))]
        for i, g in enumerate(d.get("sparse_groups", [])):
            new_tables, new_fields = _expand_sparse_group(f"schema.sparse_groups[{i}]", g)
            tables += new_tables
            sparse += new_fields
        dense = [DenseField(**_only(f"schema.dense[{i}]", s, {"name", "candidate"}))
                 for i, s in enumerate(d.get("dense", []))]
        for i, g in enumerate(d.get("dense_groups", [])):
            g = _only(f"schema.dense_groups[{i}]", g, {"prefix", "count", "candidate"})
            dense += [DenseField(name=f"{g['prefix']}_{j}", candidate=bool(g.get("candidate", False)))
                      for j in range(int(g["count"]))]
        sequences = []
        for i, s in enumerate(d.get("sequences", [])):
            s = _only(f"schema.sequences[{i}]", s, {"name", "max_len", "features"})
            feats = tuple(
                SequenceFeature(**_only(f"schema.sequences[{i}].features[{j}]", f,
                                        _names(SequenceFeature)))
                for j, f in enumerate(s.get("features", []))
            )
            sequences.append(SequenceSpec(name=s["name"], max_len=int(s["max_len"]), features=feats))
        if "labels" not in d:
            raise ValueError("schema: 'labels' is required (e.g. labels = [\"click\"])")
        return cls(
            labels=tuple(d["labels"]),
            tables=tuple(tables),
            sparse=tuple(sparse),
            dense=tuple(dense),
            sequences=tuple(sequences),
            user_id=d.get("user_id", "user_id"),
            user_id_type=d.get("user_id_type", "int64"),
            ts=d.get("ts", "ts"),
        )


def load_schema(path: str | Path) -> FeatureSchema:
    """Read the ``[schema]`` table of a TOML file."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    if "schema" not in doc:
        raise ValueError(f"{path}: no [schema] table")
    return FeatureSchema.from_dict(doc["schema"])


# ---- helpers ---------------------------------------------------------------------------------
def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(where: str, d: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}"
        )


def _only(where: str, d: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table, got {d!r}")
    _check_keys(where, d, allowed)
    return dict(d)


def _expand_sparse_group(where: str, g: dict[str, Any]) -> tuple[list[TableSpec], list[SparseField]]:
    g = _only(where, g, {"prefix", "count", "num_tables", "hash_size", "dim", "multi_valued",
                         "raw_type", "pooling", "group", "table"})
    for key in ("prefix", "count"):
        if key not in g:
            raise ValueError(f"{where}: '{key}' is required")
    prefix, count = g["prefix"], int(g["count"])
    if count <= 0:
        raise ValueError(f"{where}.count: must be positive, got {count}")
    tables: list[TableSpec] = []
    if "table" in g:  # every field of the group on one declared table
        names = [g["table"]] * count
    else:
        for key in ("hash_size", "dim"):
            if key not in g:
                raise ValueError(f"{where}: '{key}' is required unless 'table' names a table")
        num_tables = int(g.get("num_tables", 1))
        if not 1 <= num_tables <= count:
            raise ValueError(f"{where}.num_tables: must be in [1, count={count}], got {num_tables}")
        tables = [TableSpec(name=f"{prefix}_t{t}", hash_size=int(g["hash_size"]), dim=int(g["dim"]))
                  for t in range(num_tables)]
        names = [tables[j % num_tables].name for j in range(count)]
    fields = [
        SparseField(
            name=f"{prefix}_{j}", table=names[j], multi_valued=bool(g.get("multi_valued", False)),
            raw_type=g.get("raw_type", "int64"), pooling=g.get("pooling", "sum"),
            group=g.get("group", prefix),
        )
        for j in range(count)
    ]
    return tables, fields


def _validate(s: FeatureSchema) -> None:
    def dup(kind: str, names: list[str]) -> None:
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise ValueError(f"schema: duplicate {kind} name '{n}'")
            seen.add(n)

    if not s.labels:
        raise ValueError("schema.labels: at least one label column is required")
    dup("table", [t.name for t in s.tables])
    columns = (list(s.labels) + s.dense_names + s.sequence_columns
               + [f.name for f in s.sparse if f.name != s.user_id] + [s.ts])
    dup("column", columns)
    dup("sequence", [q.name for q in s.sequences])
    tables = {t.name: t for t in s.tables}
    for t in s.tables:
        if t.hash_size <= 0 or t.dim <= 0:
            raise ValueError(f"schema.tables.{t.name}: hash_size and dim must be positive")
        if t.dim % 4:
            raise ValueError(f"schema.tables.{t.name}.dim: must be a multiple of 4 (fbgemm), got {t.dim}")
        if t.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"schema.tables.{t.name}.eviction_policy: must be one of {EVICTION_POLICIES}, "
                             f"got '{t.eviction_policy}'")
        if t.eviction_interval <= 0:
            raise ValueError(f"schema.tables.{t.name}.eviction_interval: must be positive")
    if s.user_id_type not in RAW_TYPES:
        raise ValueError(f"schema.user_id_type: must be one of {RAW_TYPES}, got '{s.user_id_type}'")
    group_dims: dict[str, tuple[int, str]] = {}
    for f in s.sparse:
        where = f"schema.sparse '{f.name}'"
        if f.table not in tables:
            raise ValueError(f"{where}: unknown table '{f.table}' (declare it under [schema.tables])")
        if f.raw_type not in RAW_TYPES:
            raise ValueError(f"{where}.raw_type: must be one of {RAW_TYPES}, got '{f.raw_type}'")
        if f.pooling not in POOLINGS:
            raise ValueError(f"{where}.pooling: must be one of {POOLINGS}, got '{f.pooling}'")
        if f.id_range is not None:
            r = f.id_range
            if (f.raw_type != "int64" or len(r) != 2 or not all(isinstance(x, int) for x in r) or r[0] > r[1]):
                raise ValueError(f"{where}.id_range: expected [lo, hi] with integers lo <= hi on an int64 "
                                 f"field, got {list(r)} (raw_type {f.raw_type})")
        dim = tables[f.table].dim
        prev = group_dims.setdefault(f.group, (dim, f.name))
        if prev[0] != dim:
            raise ValueError(
                f"{where}: dim mismatch in token group '{f.group}': table '{f.table}' has dim {dim} "
                f"but field '{prev[1]}' of the same group has dim {prev[0]}"
            )
    table_pooling: dict[str, tuple[str, str]] = {}
    for f in s.sparse:
        prev_p = table_pooling.setdefault(f.table, (f.pooling, f.name))
        if prev_p[0] != f.pooling:
            raise ValueError(
                f"schema.sparse '{f.name}': pooling '{f.pooling}' differs from pooling "
                f"'{prev_p[0]}' of field '{prev_p[1]}' on the same table '{f.table}' "
                "(TorchRec pools per table)"
            )
    # an id-space table (a field and a sequence feature on it): one raw id type for all its features
    seq_tables = {f.table for q in s.sequences for f in q.features}
    kinds: dict[str, tuple[str, str]] = {}
    for where, name, table, raw in ([("schema.sparse", f.name, f.table, f.raw_type) for f in s.sparse]
                                    + [(f"schema.sequences '{q.name}' feature", f.name, f.table, f.raw_type)
                                       for q in s.sequences for f in q.features]):
        if table not in seq_tables or table not in table_pooling:
            continue
        first = kinds.setdefault(table, (raw, name))
        if first[0] != raw:
            raise ValueError(
                f"{where} '{name}': raw_type '{raw}' differs from '{first[0]}' of '{first[1]}' on the same table "
                f"'{table}'; a table serving a field and a sequence feature is one id space (the same raw id, "
                "the same row): its ids must be of one type")
    for q in s.sequences:
        where = f"schema.sequences '{q.name}'"
        if q.max_len <= 0:
            raise ValueError(f"{where}.max_len: must be positive, got {q.max_len}")
        if not q.features:
            raise ValueError(f"{where}: at least one feature is required")
        dims = set()
        for feat in q.features:
            if feat.table not in tables:
                raise ValueError(f"{where} feature '{feat.name}': unknown table '{feat.table}'")
            dims.add(tables[feat.table].dim)
        if len(dims) > 1:
            raise ValueError(f"{where}: dim mismatch, its features' tables have dims {sorted(dims)}"
                             " but aligned side features are summed into one token")


__all__ = [
    "DenseField", "FeatureSchema", "SequenceFeature", "SequenceSpec", "SparseField", "TableSpec",
    "load_schema",
]
