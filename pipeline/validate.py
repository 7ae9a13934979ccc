"""Validation: schema-level problems stop the job; row-level problems quarantine the row.

* ``check_files`` reads only Parquet footers and raises ``SchemaMismatchError`` naming the file and
  the column when a column is missing or its type disagrees with the schema. Run before training.
* ``split_valid`` is columnar: it returns the good rows and the bad rows, each bad row with the
  first reason it failed (``_reason``). Nothing is dropped: ``rows_in = good + bad``.
* ``QuarantineWriter`` is the Ray Data ``map_batches`` step that writes bad rows to
  ``<quarantine_dir>/part-*.parquet`` and passes good rows on, cast to ``canonical_schema``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embedding import storage
from embedding.schema import FeatureSchema

REASON = "_reason"
REQUEST_ID = "request_id"  # optional log column: rows that share it are the candidates of one request
SOURCE = "path"  # the source file of each row (pipeline.source tags it)


class SchemaMismatchError(ValueError):
    """A file's columns disagree with the feature schema; raised before any training."""


def _kind(t: pa.DataType) -> str:
    """The logical kind of an Arrow type, whatever physical type a writer chose: every integer
    width and signedness is ``int``, ``string``/``large_string``/``string_view`` and dictionaries
    of them ``string``, every list layout ``list<…>``; an all-null column is ``null`` and an
    all-empty list column ``list<null>`` (pandas' choices), both compatible with any kind of
    their shape (``accepts``)."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or _is_string_view(t):
        return "string"
    if _is_list_like(t):
        return f"list<{_kind(t.value_type)}>"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def accepts(got: str, kinds: set[str]) -> bool:
    """Whether a column of logical kind ``got`` (``_kind``) holds values of one of ``kinds``: the
    same kind, or all nulls (``null``: each row is then quarantined as a null), or all-empty
    lists (``list<null>``) where a list is expected."""
    return (got in kinds or got == "null"
            or (got == "list<null>" and any(k.startswith("list<") for k in kinds)))


def _is_string_view(t: pa.DataType) -> bool:
    return getattr(pa.types, "is_string_view", lambda _: False)(t)


def _is_list_like(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or getattr(pa.types, "is_list_view", lambda _: False)(t)
            or getattr(pa.types, "is_large_list_view", lambda _: False)(t))


def normalize(table: pa.Table, schema: FeatureSchema) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The schema's columns of ``table`` in their canonical physical types wherever the logical
    kind matches (``_kind``), and the rows that cannot be read as their kind, by reason.

    * integer ids of any width → int64; ``uint64`` ids keep their 64 bits (a value ≥ 2^63 reads
      as the negative int64 of the same bits: an id is opaque, hashed as its bits everywhere —
      training, scoring and serving normalise alike);
    * dictionary-encoded columns are decoded; ``large_string``/``string_view`` → ``string``;
    * every list layout → ``list<…>`` with its elements normalised; ``list<null>`` (all lists
      empty) → the schema's list type; an all-``null`` column → the schema's type (all nulls);
    * boolean labels → float32 (0/1);
    * string values that are not valid UTF-8 stay as their bytes, and their rows are returned
      under ``invalid UTF-8 in '<column>'`` (the caller quarantines them, nothing is lost).

    Columns of another kind are left as they are (the type checks name them); columns the schema
    does not read are untouched. Idempotent."""
    target = canonical_schema(schema)
    wanted = {f.name: f.type for f in target} | {REQUEST_ID: None}
    bad: dict[str, np.ndarray] = {}
    for i, name in enumerate(table.schema.names):
        if name not in wanted:
            continue
        col = table.column(i)
        want = wanted[name] if name != REQUEST_ID else _request_id_target(col.type)
        if want is None:
            continue
        new = col
        if col.type != want:
            chunks = [_to_type(c, want) for c in col.chunks]
            if any(c is None for c in chunks):
                continue  # another kind: the type check names it
            typ = chunks[0].type if chunks else want  # dense and label floats keep their width
            if typ != col.type:
                new = pa.chunked_array(chunks, type=typ)
                table = table.set_column(i, table.schema.field(i).with_type(typ), new)
        if name != REQUEST_ID and _has_strings(new.type):
            invalid = _invalid_utf8_rows(new)
            if invalid is not None:
                bad[f"invalid UTF-8 in '{name}'"] = invalid
    return table, bad


def _request_id_target(t: pa.DataType) -> pa.DataType | None:
    """``request_id`` as int64 or string, whatever the writer's integer or string layout."""
    kind = _kind(t)
    return {"int": pa.int64(), "string": pa.string()}.get(kind)


def _to_type(arr: pa.Array, want: pa.DataType) -> pa.Array | None:
    """``arr`` as ``want`` when its logical kind is ``want``'s (``normalize``), else None."""
    t = arr.type
    if t == want:
        return arr
    if pa.types.is_dictionary(t):
        return _to_type(arr.dictionary_decode(), want)
    if pa.types.is_null(t):
        return pa.nulls(len(arr), want)
    if pa.types.is_integer(want) and pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            return arr.view(pa.int64())  # the same 64 bits
        return arr.cast(want)  # every other width fits int64 exactly
    if pa.types.is_floating(want) and pa.types.is_boolean(t):
        return arr.cast(want)  # a boolean label: 0/1
    if pa.types.is_floating(want) and (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return arr  # dense values and labels: the checks read them as written, to_canonical casts
    if pa.types.is_string(want) and (pa.types.is_large_string(t) or _is_string_view(t)):
        return _as_string(arr)
    if pa.types.is_list(want) and _is_list_like(t):
        values = _to_type(pc.list_flatten(arr), want.value_type)  # every layout, any slice offset
        if values is None:
            return None
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, values, type=want,
                                        mask=arr.is_null() if arr.null_count else None)
    return None


def _as_string(arr: pa.Array) -> pa.Array:
    """A large_string / string_view array as ``string`` without validating its bytes (invalid
    UTF-8 is found and reported by ``normalize``, not an error here)."""
    binary = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary()).cast(pa.binary())
    return pa.Array.from_buffers(pa.string(), len(binary), binary.buffers(), null_count=binary.null_count,
                                 offset=binary.offset)


def _has_strings(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or (pa.types.is_list(t) and _has_strings(t.value_type))


def _invalid_utf8_rows(col: pa.ChunkedArray) -> np.ndarray | None:
    """Rows of a string (or list<string>) column holding a value that is not valid UTF-8; None
    when every value is valid (the usual case: one ``validate(full=True)`` pass)."""
    try:
        col.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    out = []
    for chunk in col.chunks:
        is_list = pa.types.is_list(chunk.type)
        flat = chunk.flatten() if is_list else chunk
        hit = np.array([v is not None and not _utf8(v) for v in _binary_values(flat)], dtype=bool)
        out.append(_rows_with(chunk, hit) if is_list else hit)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _binary_values(arr: pa.Array) -> list:
    return pa.Array.from_buffers(pa.binary(), len(arr), arr.buffers(), null_count=arr.null_count,
                                 offset=arr.offset).to_pylist()


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def expected_kinds(schema: FeatureSchema) -> dict[str, set[str]]:
    """Column → accepted type kinds."""
    id_kind = {"int64": "int", "string": "string"}
    exp: dict[str, set[str]] = {schema.ts: {"int"}}
    exp[schema.user_id] = {id_kind[schema.user_id_type]}
    for label in schema.labels:
        exp[label] = {"int", "float", "bool"}
    for f in schema.dense:
        exp[f.name] = {"float"}
    for f in schema.sparse:
        k = id_kind[f.raw_type]
        exp[f.name] = {f"list<{k}>"} if f.multi_valued else {k}
    for q in schema.sequences:
        for feat in q.features:
            exp[q.column(feat)] = {f"list<{id_kind[feat.raw_type]}>"}
    return exp


def canonical_schema(schema: FeatureSchema, with_labels: bool = True) -> pa.Schema:
    """The one arrow schema every validated block is cast to (int64 ids, float32 dense and
    labels, ``list<…>`` lists), so blocks from files with different accepted widths concatenate."""
    ids = {"int64": pa.int64(), "string": pa.string()}
    fields = [pa.field(schema.ts, pa.int64()), pa.field(schema.user_id, ids[schema.user_id_type])]
    if with_labels:
        fields += [pa.field(n, pa.float32()) for n in schema.labels]
    fields += [pa.field(f.name, pa.float32()) for f in schema.dense]
    for f in schema.sparse:
        if f.name != schema.user_id:
            fields.append(pa.field(f.name, pa.list_(ids[f.raw_type]) if f.multi_valued else ids[f.raw_type]))
    for q in schema.sequences:
        fields += [pa.field(q.column(f), pa.list_(ids[f.raw_type])) for f in q.features]
    return pa.schema(fields)


def to_canonical(table: pa.Table, schema: FeatureSchema, with_labels: bool = True,
                 keep: tuple[str, ...] = ()) -> pa.Table:
    """The schema's columns in the canonical layout, plus any of ``keep`` the table has (as
    they are, e.g. ``request_id``)."""
    target = canonical_schema(schema, with_labels)
    out = normalize(table.select(target.names), schema)[0].cast(target)
    for col in keep:
        if col in table.column_names:
            out = out.append_column(col, table.column(col))
    return out


UNKNOWN_COLUMNS = ("warn", "error", "ignore")


def check_files(files: list[Path], schema: FeatureSchema, unknown: str = "warn", log=print) -> int:
    """Check every file's footer against the schema; return the total row count. Columns the
    schema does not read are ignored; ``unknown="warn"`` prints one line naming them,
    ``"error"`` stops on the first file that has one."""
    if unknown not in UNKNOWN_COLUMNS:
        raise ValueError(f"unknown_columns: choose one of {UNKNOWN_COLUMNS}, got '{unknown}'")
    exp = expected_kinds(schema)
    rows = 0
    extra: dict[str, int] = {}
    for path in files:
        try:
            meta = storage.retry(lambda path=path: pq.read_metadata(path), f"reading the footer of {path}")
        except (pa.ArrowInvalid, OSError) as e:
            raise SchemaMismatchError(f"{path}: not a readable Parquet file ({e})") from None
        arrow = meta.schema.to_arrow_schema()
        counts = Counter(arrow.names)
        repeated = sorted(c for c, n in counts.items() if n > 1 and (c in exp or c == REQUEST_ID))
        if repeated:
            raise SchemaMismatchError(f"{path}: column(s) {repeated} appear more than once "
                                      f"({', '.join(f'{c!r} ×{counts[c]}' for c in repeated)}); "
                                      "each column name must be unique in a file")
        for col, kinds in exp.items():
            idx = arrow.get_field_index(col)
            if idx < 0:
                raise SchemaMismatchError(f"{path}: column '{col}' is missing (schema expects {sorted(kinds)})")
            got = _kind(arrow.field(idx).type)
            if not accepts(got, kinds):
                raise SchemaMismatchError(
                    f"{path}: column '{col}' has type {arrow.field(idx).type} ({got}), "
                    f"schema expects {' or '.join(sorted(kinds))}"
                )
        if REQUEST_ID in arrow.names and _kind(arrow.field(REQUEST_ID).type) not in ("int", "string"):
            raise SchemaMismatchError(f"{path}: column '{REQUEST_ID}' has type {arrow.field(REQUEST_ID).type}; "
                                      f"request ids are int or string")
        for col in arrow.names:
            if col not in exp and col != REQUEST_ID:
                if unknown == "error":
                    raise SchemaMismatchError(f"{path}: column '{col}' is not in the schema "
                                              f"([train].unknown_columns = \"error\"; \"warn\" ignores it)")
                extra[col] = extra.get(col, 0) + 1
        rows += meta.num_rows
    if extra and unknown == "warn":
        log(f"warning: columns the schema does not read are ignored: "
            f"{', '.join(f'{c} ({n} files)' for c, n in sorted(extra.items()))}")
    return rows


def request_id_type(files: list[Path]) -> pa.DataType | None:
    """The one type the ``request_id`` column takes over ``files`` (int64 or string; None when no
    file has one), read from the footers. Files without the column get nulls of that type.

    Raises ``SchemaMismatchError`` naming two files when one has int ids and another strings."""
    seen: dict[str, Path] = {}
    for path in files:
        fs, where = pafs.FileSystem.from_uri(str(path)) if "://" in str(path) else (None, str(path))
        arrow = pq.read_schema(where, filesystem=fs)
        if REQUEST_ID in arrow.names:
            seen.setdefault(_kind(arrow.field(REQUEST_ID).type), path)
    if len(seen) > 1:
        raise SchemaMismatchError(f"column '{REQUEST_ID}' is int in {seen.get('int')} but string in "
                                  f"{seen.get('string')}; use one type for request ids")
    return {"int": pa.int64(), "string": pa.string()}[next(iter(seen))] if seen else None


def first_valid_row(files: list[Path], schema: FeatureSchema) -> pa.Table:
    """One valid row (schema columns only): the shape template for a worker's padding steps."""
    columns = list(expected_kinds(schema))
    for path in files:
        good, _ = split_valid(pq.read_table(path, columns=columns), schema)
        if good.num_rows:
            return to_canonical(good.slice(0, 1), schema)
    raise ValueError(f"no valid row in any of {len(files)} files; see the quarantine reasons")


def _np(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def split_valid(table: pa.Table, schema: FeatureSchema, check_labels: bool = True,
                duplicate: np.ndarray | None = None,
                request_groups: tuple[str, ...] | None = None) -> tuple[pa.Table, pa.Table]:
    """(good rows, bad rows + ``_reason``), columnar; each bad row carries its first failure.
    ``check_labels=False`` for serving requests, which carry no labels. ``duplicate``: rows
    already seen (``DuplicateFinder``), quarantined as duplicates. ``request_groups`` (the
    candidate token groups) with a ``request_id`` column: every row of a request whose rows
    disagree on a request-level column is bad (``pipeline.requests``)."""
    n = table.num_rows
    reason = np.full(n, "", dtype=object)
    bad = np.zeros(n, dtype=bool)  # rows with a reason already: the first failure is kept

    def flag(mask: np.ndarray | None, why: str) -> None:
        if mask is None:
            return
        hit = mask & ~bad
        if hit.any():
            reason[hit] = why
            bad[hit] = True

    def nulls(col: str) -> np.ndarray | None:
        c = table.column(col)
        return _np(c.is_null()) if c.null_count else None

    table, unreadable = normalize(table, schema)  # any physical typing of the same logical kinds
    for why, mask in unreadable.items():
        flag(mask, why)

    for label in schema.labels if check_labels else ():
        flag(nulls(label), f"null label '{label}'")
        c = _filled(table.column(label))
        flag(~_np(pc.is_in(c, pa.array([0, 1], c.type))), f"label '{label}' not 0 or 1")
    flag(nulls(schema.user_id), f"null user id '{schema.user_id}'")
    flag(nulls(schema.ts), f"null timestamp '{schema.ts}'")
    for f in schema.dense:
        flag(nulls(f.name), f"null dense '{f.name}'")
        flag(~_np(pc.is_finite(_filled(table.column(f.name)))), f"NaN or inf dense '{f.name}'")
    for f in schema.sparse:
        flag(nulls(f.name), f"null id '{f.name}'")
        if f.multi_valued and pc.list_flatten(table.column(f.name)).null_count:
            flag(_list_has_null(table.column(f.name)), f"null element in '{f.name}'")
        if f.id_range is not None:
            flag(_out_of_range(table.column(f.name), f.id_range), f"id out of range in '{f.name}' "
                                                                  f"(allowed {f.id_range[0]}..{f.id_range[1]})")
    for q in schema.sequences:
        first = None
        for col in q.columns:
            flag(nulls(col), f"null sequence list '{col}'")
            if pc.list_flatten(table.column(col)).null_count:
                flag(_list_has_null(table.column(col)), f"null element in sequence '{col}'")
            lens = pc.list_value_length(table.column(col)).fill_null(-1).to_numpy(zero_copy_only=False)
            if first is None:
                first = lens
            else:
                flag(lens != first, f"misaligned sequence '{q.name}': '{col}' length differs from "
                                    f"'{q.columns[0]}'")
    if duplicate is not None:
        flag(duplicate, "duplicate row (the same values as an earlier row of this file)")
    if request_groups is not None and REQUEST_ID in table.column_names and n:
        from pipeline.requests import group_requests  # it hashes rows with this module's helpers

        groups = group_requests(table, schema, request_groups)
        if groups.bad.any():
            ids = table.column(REQUEST_ID)
            for rid, why in groups.reasons.items():
                flag(_np(pc.equal(ids, pa.scalar(rid, ids.type)).fill_null(False)), why)
    if not bad.any():
        return table, table.slice(0, 0).append_column(REASON, pa.array([], pa.string()))
    good_rows = table.filter(pa.array(~bad))
    bad_rows = table.filter(pa.array(bad)).append_column(REASON, pa.array(reason[bad].astype(str)))
    return good_rows, bad_rows


def _filled(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return col.fill_null(0) if col.null_count else col


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _rows_with(arr: pa.Array, flat_hit: np.ndarray) -> np.ndarray:
    """Per row of a list array: does any of its elements have ``flat_hit`` (one per element)?"""
    lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    out = np.zeros(len(arr), dtype=bool)
    out[np.repeat(np.arange(len(arr)), lens)[flat_hit]] = True
    return out


def _out_of_range(col: pa.ChunkedArray | pa.Array, lo_hi: tuple[int, int]) -> np.ndarray:
    """Per row: does the (single or multi-valued) int id column hold an id outside [lo, hi]?"""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lo, hi = lo_hi
    flat = pc.list_flatten(arr) if _is_list(arr.type) else arr
    if not pa.types.is_integer(flat.type):
        return np.zeros(len(arr), dtype=bool)  # a string id: the type check names it
    vals = flat.fill_null(lo).to_numpy(zero_copy_only=False)
    hit = (vals < lo) | (vals > hi)
    return _rows_with(arr, hit) if _is_list(arr.type) else hit


def _list_has_null(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row: does the list hold a null element?"""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return _rows_with(arr, _np(pc.list_flatten(arr).is_null()))


class QuarantineWriter:
    """Ray Data ``map_batches`` step (pyarrow batches): bad rows → quarantine Parquet, good rows on."""

    def __init__(self, schema: FeatureSchema, quarantine_dir: str,
                 request_groups: tuple[str, ...] | None = None, request_type: pa.DataType | None = None) -> None:
        """``request_groups``: check requests (``split_valid``) and keep ``request_id``, cast to
        ``request_type`` (nulls for a file without the column, so blocks concatenate)."""
        self.schema, self.request_groups = schema, request_groups
        self.dir = str(quarantine_dir) if storage.is_uri(quarantine_dir) else Path(quarantine_dir)
        self.request_type = request_type

    def __call__(self, table: pa.Table, duplicate: np.ndarray | None = None) -> pa.Table:
        good, bad = split_valid(table, self.schema, duplicate=duplicate, request_groups=self.request_groups)
        if bad.num_rows:
            self.write(bad, table)
        out = to_canonical(good, self.schema)  # schema columns only, one type per column
        if self.request_groups is not None and self.request_type is not None:
            ids = (good.column(REQUEST_ID).cast(self.request_type) if REQUEST_ID in good.column_names
                   else pa.nulls(good.num_rows, self.request_type))
            out = out.append_column(REQUEST_ID, ids)
        return out

    def write(self, bad: pa.Table, block: pa.Table) -> None:
        """Publish ``bad`` rows (with ``REASON``) atomically, named by the whole ``block``'s content
        (rows and their source path): a block re-read (next epoch, retried task) rewrites the same
        file; two different blocks never share a name, even when their bad rows are identical.
        Locally a temporary file is renamed; on an object store one object is written (visible
        whole or not at all), retried on transient errors."""
        name = _block_name(block)
        if isinstance(self.dir, str):
            fs, path = storage.filesystem(storage.join(self.dir, name))
            storage.retry(lambda: pq.write_table(bad, path, filesystem=fs), f"writing {self.dir}/{name}")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(bad, tmp)
        tmp.rename(self.dir / name)  # atomic publish


def _block_name(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return f"part-{hashlib.sha256(sink.getvalue()).hexdigest()[:24]}.parquet"


def count_quarantined(quarantine_dir: str | Path) -> tuple[int, dict[str, int]]:
    """Rows in the quarantine folder (a local folder or an object-store URI), total and by reason."""
    files = [storage.join(quarantine_dir, f) for f in storage.files_under(quarantine_dir)
             if "/" not in f and f.startswith("part-") and f.endswith(".parquet")]
    if not files:
        return 0, {}
    reasons = pa.concat_tables([pq.read_table(f, columns=[REASON]) for f in files]).column(REASON)
    counts = pc.value_counts(reasons).to_pylist()
    return len(reasons), {c["values"]: c["counts"] for c in counts}
