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

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.schema import FeatureSchema
from pipeline.batch import Batch


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
    """Indices into the flat values that keep each row's last ``max_len`` elements, and the
    new lengths."""
    new_lengths = np.minimum(lengths, max_len)
    new_ends = np.cumsum(new_lengths)
    # element j of row r sits at new_offset[r] + j in the output and at start[r] + j in the input
    shift = (np.cumsum(lengths) - new_lengths) - (new_ends - new_lengths)
    idx = np.arange(int(new_ends[-1]) if len(new_ends) else 0) + np.repeat(shift, new_lengths)
    return idx, new_lengths


def collate(table: pa.Table, schema: FeatureSchema, pad_to: int | None = None,
            padding_row: pa.Table | None = None, with_labels: bool = True) -> Batch:
    """Build a ``Batch`` from rows that passed ``pipeline.validate``.

    With ``pad_to``, the batch is filled up to that many rows with copies of ``padding_row``
    (weight 0): sharded collectives need the same batch size on every worker. Serving requests
    have no labels: ``with_labels=False`` fills ``labels`` with zeros.
    """
    real = table.num_rows
    if pad_to is not None and real < pad_to:
        if padding_row is None:
            raise ValueError("collate: pad_to needs a padding_row")
        columns = padding_row.column_names
        fill = padding_row.take(np.zeros(pad_to - real, dtype=np.int64))  # one vectorized copy
        table = pa.concat_tables([table.select(columns).cast(padding_row.schema), fill])
    n = table.num_rows
    weights = np.zeros(n, dtype=np.float32)
    weights[:real] = 1.0
    rb = _one_batch(table)
    plan = _plan(schema)
    ints = _int_block(rb, plan.int_columns)  # every single-valued int field in one Arrow call
    values = []
    lengths = np.ones(len(schema.sparse) * n, dtype=np.int64)  # single-valued: 1; lists below
    at = 0  # this key's first row in lengths
    for seg in plan.segments:
        if seg[0] == "ints":
            values.append(ints[seg[1]:seg[2]].reshape(-1))
            at += (seg[2] - seg[1]) * n
            continue
        f = seg[1]
        if f.multi_valued:
            flat, lens = _list_parts(rb.column(f.name))
            values.append(_ids(flat, f.raw_type))
            lengths[at:at + n] = lens
        else:
            values.append(_ids(rb.column(f.name), f.raw_type))
        at += n
    fields = KeyedJaggedTensor(
        keys=schema.field_names,
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(lengths),
        stride=n,
    )
    sequences = None
    if schema.sequences:
        s_values, s_lengths = [], []
        for q in schema.sequences:
            _, lens = _list_parts(rb.column(q.columns[0]))
            idx = None
            if n and lens.max() > q.max_len:  # else every row is kept whole: no gather
                idx, lens = keep_newest(lens, q.max_len)
            for feat in q.features:
                flat, _ = _list_parts(rb.column(q.column(feat)))
                ids = _ids(flat, feat.raw_type)
                s_values.append(ids if idx is None else ids[idx])
                s_lengths.append(lens)
        sequences = KeyedJaggedTensor(
            keys=schema.sequence_columns,
            values=torch.from_numpy(np.concatenate(s_values)),
            lengths=torch.from_numpy(np.concatenate(s_lengths)),
            stride=n,
        )
    return Batch(
        dense=torch.from_numpy(_floats(rb, schema.dense_names, n)),
        fields=fields,
        sequences=sequences,
        labels=torch.from_numpy(_floats(rb, list(schema.labels), n) if with_labels
                                else np.zeros((n, len(schema.labels)), dtype=np.float32)),
        user_ids=torch.from_numpy(np.array(_ids(rb.column(schema.user_id), schema.user_id_type))),
        weights=torch.from_numpy(weights),
    )

