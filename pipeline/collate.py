"""Columnar collate: one validated ``pyarrow.Table`` → one ``Batch``.

Everything is vectorized over rows. Single-valued int fields — most of a wide schema — are read
by Arrow in one call for all of them (``to_tensor``); Python steps only over string fields,
multi-valued fields and sequences. Example with two
rows and fields ``a`` (single-valued) and ``t`` (multi-valued)::

    a: [7, 9]            t: [[1, 2], [3]]
    fields KJT  keys ["a", "t"]   values [7, 9, 1, 2, 3]   lengths [1, 1, 2, 1]

A sequence longer than its ``max_len`` keeps its newest (last) ``max_len`` elements::

    hist_item: [[1, 2, 3], [4]]  with max_len 2  →  values [2, 3, 4]  lengths [2, 1]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.schema import FeatureSchema
from pipeline.batch import Batch
from pipeline.validate import REQUEST_ID


def hash_strings(arr: pa.Array | np.ndarray) -> np.ndarray:
    """Stable 64-bit ids for string ids (SipHash with a fixed key, the same in every process)."""
    values = arr.to_numpy(zero_copy_only=False) if isinstance(arr, (pa.Array, pa.ChunkedArray)) else arr
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=True).view(np.int64)


def _ids(arr: pa.Array, raw_type: str) -> np.ndarray:
    if raw_type == "string":
        return hash_strings(arr)
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """The table as one record batch: zero-copy when every column has one chunk (a table from
    ``iter_batches``), one ``combine_chunks`` otherwise (a padded batch)."""
    batches = table.to_batches()
    if len(batches) != 1:
        batches = table.combine_chunks().to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
    return batches[0]


@dataclass(frozen=True)
class _Plan:
    """How a schema's sparse fields are read, worked out once per schema: single-valued int64
    fields are read together (``int_columns``), in runs of consecutive keys; string and
    multi-valued fields one by one."""

    int_columns: list[str]  # the single-valued int fields, in key order
    segments: list[tuple]  # key order: ("ints", first, end) into int_columns | ("one", field)


_PLANS: dict[int, tuple[FeatureSchema, _Plan]] = {}


def _plan(schema: FeatureSchema) -> _Plan:
    hit = _PLANS.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    ints, segments = [], []
    for f in schema.sparse:
        if not f.multi_valued and f.raw_type == "int64":
            if segments and segments[-1][0] == "ints":
                segments[-1] = ("ints", segments[-1][1], len(ints) + 1)
            else:
                segments.append(("ints", len(ints), len(ints) + 1))
            ints.append(f.name)
        else:
            segments.append(("one", f))
    plan = _Plan(ints, segments)
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[id(schema)] = (schema, plan)
    return plan


def _int_block(rb: pa.RecordBatch, names: list[str]) -> np.ndarray:
    """Columns ``names`` (integers, no nulls) as one int64 array [len(names), rows], read by
    Arrow in one call (``to_tensor``, column-major): no Python step per column."""
    if not names:
        return np.zeros((0, rb.num_rows), dtype=np.int64)
    if rb.num_rows == 0:
        return np.zeros((len(names), 0), dtype=np.int64)
    return np.asarray(rb.select(names).to_tensor(row_major=False)).T.astype(np.int64, copy=False)


def _list_parts(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flat values, lengths) of a list array without nulls (validated rows), slice-safe: read
    straight off the offsets buffer instead of running compute kernels."""
    offsets = arr.offsets.to_numpy()
    lo, hi = int(offsets[0]), int(offsets[-1])
    return arr.values.slice(lo, hi - lo), np.diff(offsets).astype(np.int64, copy=False)


def _floats(rb: pa.RecordBatch, names: list[str], n: int) -> np.ndarray:
    """Columns ``names`` as float32 [rows, len(names)], in one Arrow call."""
    if not names or n == 0:
        return np.zeros((n, len(names)), dtype=np.float32)
    return np.ascontiguousarray(np.asarray(rb.select(names).to_tensor(row_major=True)), dtype=np.float32)


def keep_newest(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A mask over the flat values that keeps each row's last ``max_len`` elements, and the
    new lengths. Only the dropped elements are indexed (the oldest of the over-long rows), so
    it costs little when few rows are over-long."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = np.ones(int(lengths.sum()), dtype=bool)
    cut = lengths - max_len
    over = np.flatnonzero(cut > 0)
    if len(over):
        cut = cut[over]
        starts = np.cumsum(lengths)[over] - lengths[over]  # each over-long row's first element
        ends = np.cumsum(cut)
        keep[np.repeat(starts - (ends - cut), cut) + np.arange(int(ends[-1]))] = False
    return keep, np.minimum(lengths, max_len)


class Decoded:
    """A validated table decoded once; ``batch(lo, hi)`` cuts the ``Batch`` of rows
    ``[lo, hi)`` from it.

    Everything that costs per row runs once over the whole table: the single-valued int fields
    in one Arrow call, string hashing, the newest-``max_len`` gather of every sequence, dense
    and label matrices. A batch is then slices of those arrays and one concatenation per KJT:
    a worker decodes each Ray Data block once and cuts all its batches from it
    (``collate_blocks``), instead of decoding 512 rows at a time (docs/benchmarks.md).
    ``overlong`` marks the rows whose behaviour sequence was cut to ``max_len``."""

    def __init__(self, table: pa.Table, schema: FeatureSchema, with_labels: bool = True) -> None:
        rb = _one_batch(table)
        n = self.n = rb.num_rows
        plan = _plan(schema)
        self.schema = schema
        self.ints = _int_block(rb, plan.int_columns)  # every single-valued int field, one Arrow call
        self.fields = []  # key order: ("ints", first, end) | ("ids", ids, offsets or None: one a row)
        self.field_lengths = np.ones((len(schema.sparse), n), dtype=np.int64)  # [key, row]
        row = 0  # the key's row in field_lengths
        for seg in plan.segments:
            if seg[0] == "ints":
                self.fields.append(seg)
                row += seg[2] - seg[1]
                continue
            f = seg[1]
            row += 1
            if f.multi_valued:
                flat, lens = _list_parts(rb.column(f.name))
                self.field_lengths[row - 1] = lens
                self.fields.append(("ids", _ids(flat, f.raw_type), _offsets(lens)))
            else:
                self.fields.append(("ids", _ids(rb.column(f.name), f.raw_type), None))
        self.sequences = []  # one (ids, offsets) per sequence column, key order
        seq_lengths = []
        self.overlong = np.zeros(n, dtype=bool)
        for q in schema.sequences:
            _, lens = _list_parts(rb.column(q.columns[0]))
            keep = None
            if n and lens.max() > q.max_len:  # else every row is kept whole: no copy
                self.overlong |= lens > q.max_len
                keep, lens = keep_newest(lens, q.max_len)
            offsets = _offsets(lens)
            for feat in q.features:
                flat, _ = _list_parts(rb.column(q.column(feat)))
                ids = _ids(flat, feat.raw_type)
                self.sequences.append((ids if keep is None else ids[keep], offsets))
                seq_lengths.append(lens)
        self.sequence_lengths = np.stack(seq_lengths) if seq_lengths else None  # [column, row]
        self.dense = _floats(rb, schema.dense_names, n)
        self.labels = (_floats(rb, list(schema.labels), n) if with_labels
                       else np.zeros((n, len(schema.labels)), dtype=np.float32))
        self.user_ids = np.array(_ids(rb.column(schema.user_id), schema.user_id_type))  # writable
        self.request_ids = None
        if REQUEST_ID in rb.schema.names:  # a null id: a row of its own (-1)
            col = rb.column(REQUEST_ID)
            text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            col = col.cast(pa.string() if text else pa.int64())
            ids = _ids(col.fill_null("" if text else 0), "string" if text else "int64")
            self.request_ids = np.where(col.is_null().to_numpy(zero_copy_only=False), -1, ids).astype(np.int64)

    def batch(self, lo: int = 0, hi: int | None = None, real: int | None = None) -> Batch:
        """Rows ``[lo, hi)`` as a ``Batch``; the first ``real`` of them weigh 1, the rest 0."""
        hi = self.n if hi is None else hi
        m = hi - lo
        weights = np.zeros(m, dtype=np.float32)
        weights[:m if real is None else real] = 1.0
        values = []
        for part in self.fields:
            if part[0] == "ints":
                values.append(self.ints[part[1]:part[2], lo:hi].reshape(-1))
            elif part[2] is None:
                values.append(part[1][lo:hi])
            else:
                values.append(part[1][part[2][lo]:part[2][hi]])
        fields = KeyedJaggedTensor(
            keys=self.schema.field_names,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(self.field_lengths[:, lo:hi].reshape(-1)),
            stride=m,
        )
        sequences = None
        if self.sequence_lengths is not None:
            sequences = KeyedJaggedTensor(
                keys=self.schema.sequence_columns,
                values=torch.from_numpy(np.concatenate([ids[o[lo]:o[hi]] for ids, o in self.sequences])),
                lengths=torch.from_numpy(self.sequence_lengths[:, lo:hi].reshape(-1)),
                stride=m,
            )
        return Batch(
            dense=torch.from_numpy(self.dense[lo:hi]),
            fields=fields,
            sequences=sequences,
            labels=torch.from_numpy(self.labels[lo:hi]),
            user_ids=torch.from_numpy(self.user_ids[lo:hi]),
            weights=torch.from_numpy(weights),
            request_ids=None if self.request_ids is None else torch.from_numpy(self.request_ids[lo:hi]),
        )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def collate(table: pa.Table, schema: FeatureSchema, pad_to: int | None = None,
            padding_row: pa.Table | None = None, with_labels: bool = True) -> Batch:
    """Build a ``Batch`` from rows that passed ``pipeline.validate``.

    With ``pad_to``, the batch is filled up to that many rows with copies of ``padding_row``
    (weight 0): sharded collectives need the same batch size on every worker. Serving requests
    have no labels: ``with_labels=False`` fills ``labels`` with zeros.
    """
    real = table.num_rows
    return Decoded(_padded(table, pad_to, padding_row), schema, with_labels).batch(real=real)


def _padded(table: pa.Table, pad_to: int | None, padding_row: pa.Table | None) -> pa.Table:
    """``table`` filled up to ``pad_to`` rows with copies of ``padding_row``."""
    if pad_to is None or table.num_rows >= pad_to:
        return table
    if padding_row is None:
        raise ValueError("collate: pad_to needs a padding_row")
    fill = padding_row.take(np.zeros(pad_to - table.num_rows, dtype=np.int64))  # one vectorized copy
    return pa.concat_tables([table.select(padding_row.column_names).cast(padding_row.schema), fill])


def collate_blocks(blocks: Iterable[pa.Table], schema: FeatureSchema, size: int,
                   padding_row: pa.Table | None = None) -> Iterator[tuple[Batch, int]]:
    """``(batch, rows cut to max_len)`` for consecutive ``size``-row batches of a stream of
    validated blocks: the same batches as ``collate`` over ``pipeline.source.rebatch``, in the
    same order, but each of ``batch_runs``' tables is decoded once (``Decoded``) and its batches
    cut from it. With ``padding_row``, a short last batch is padded to ``size`` (weight 0)."""
    from pipeline.source import batch_runs  # here, not at the top: serving imports collate without Ray

    for run in batch_runs(blocks, size):
        real = run.num_rows
        if real < size and padding_row is not None:  # only the last run is short
            run = _padded(run, size, padding_row)
        d = Decoded(run, schema)
        for lo in range(0, real, size):
            hi = min(lo + size, real)
            yield d.batch(lo, min(lo + size, d.n), real=hi - lo), int(d.overlong[lo:hi].sum())
