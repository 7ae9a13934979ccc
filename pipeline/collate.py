"""Columnar collate: one validated ``pyarrow.Table`` → one ``Batch``.

Everything is vectorized over rows; the only Python loops run over columns. Example with two
rows and fields ``a`` (single-valued) and ``t`` (multi-valued)::

    a: [7, 9]            t: [[1, 2], [3]]
    fields KJT  keys ["a", "t"]   values [7, 9, 1, 2, 3]   lengths [1, 1, 2, 1]

A sequence longer than its ``max_len`` keeps its newest (last) ``max_len`` elements::

    hist_item: [[1, 2, 3], [4]]  with max_len 2  →  values [2, 3, 4]  lengths [2, 1]
"""

from __future__ import annotations

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


def _arrays(table: pa.Table) -> dict[str, pa.Array]:
    """Name → one contiguous array per column. A table from ``iter_batches`` has one chunk per
    column, so this is a lookup, not a copy (``combine_chunks`` only where a column has several)."""
    return {name: col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            for name, col in zip(table.column_names, table.columns)}


def _list_parts(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flat values, lengths) of a list array without nulls (validated rows), slice-safe: read
    straight off the offsets buffer instead of running compute kernels."""
    offsets = arr.offsets.to_numpy()
    lo, hi = int(offsets[0]), int(offsets[-1])
    return arr.values.slice(lo, hi - lo), np.diff(offsets).astype(np.int64, copy=False)


def _floats(cols: dict[str, pa.Array], names: list[str], n: int) -> np.ndarray:
    if not names:
        return np.zeros((n, 0), dtype=np.float32)
    out = np.empty((n, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        out[:, j] = cols[name].to_numpy(zero_copy_only=False)
    return out


def keep_newest(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the flat values that keep each row's last ``max_len`` elements, and the
    new lengths."""
    ends = np.cumsum(lengths)
    new_lengths = np.minimum(lengths, max_len)
    starts = ends - new_lengths
    total = int(new_lengths.sum())
    row_start = np.repeat(starts, new_lengths)
    new_offsets = np.cumsum(new_lengths) - new_lengths
    idx = np.arange(total) - np.repeat(new_offsets, new_lengths) + row_start
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
    cols = _arrays(table)
    values, lengths = [], []
    ones = np.ones(n, dtype=np.int64)
    for f in schema.sparse:
        if f.multi_valued:
            flat, lens = _list_parts(cols[f.name])
            values.append(_ids(flat, f.raw_type))
            lengths.append(lens)
        else:
            values.append(_ids(cols[f.name], f.raw_type))
            lengths.append(ones)
    fields = KeyedJaggedTensor(
        keys=schema.field_names,
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int64)),
        stride=n,
    )
    sequences = None
    if schema.sequences:
        s_values, s_lengths = [], []
        for q in schema.sequences:
            _, lens = _list_parts(cols[q.columns[0]])
            idx, new_lens = keep_newest(lens, q.max_len)
            for feat in q.features:
                flat, _ = _list_parts(cols[q.column(feat)])
                s_values.append(_ids(flat, feat.raw_type)[idx])
                s_lengths.append(new_lens)
        sequences = KeyedJaggedTensor(
            keys=schema.sequence_columns,
            values=torch.from_numpy(np.concatenate(s_values)),
            lengths=torch.from_numpy(np.concatenate(s_lengths)),
            stride=n,
        )
    return Batch(
        dense=torch.from_numpy(_floats(cols, schema.dense_names, n)),
        fields=fields,
        sequences=sequences,
        labels=torch.from_numpy(_floats(cols, list(schema.labels), n) if with_labels
                                else np.zeros((n, len(schema.labels)), dtype=np.float32)),
        user_ids=torch.from_numpy(np.array(_ids(cols[schema.user_id], schema.user_id_type))),
        weights=torch.from_numpy(weights),
    )
