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
import pyarrow.compute as pc
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


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _list_parts(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flat values, lengths) of a list array, slice-safe."""
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.list_flatten(arr), lengths


def _floats(table: pa.Table, names: list[str]) -> np.ndarray:
    if not names:
        return np.zeros((table.num_rows, 0), dtype=np.float32)
    return np.stack([_column(table, n).to_numpy(zero_copy_only=False) for n in names],
                    axis=1).astype(np.float32, copy=False)


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
    values, lengths = [], []
    for f in schema.sparse:
        arr = _column(table, f.name)
        if f.multi_valued:
            flat, lens = _list_parts(arr)
            values.append(_ids(flat, f.raw_type))
            lengths.append(lens)
        else:
            values.append(_ids(arr, f.raw_type))
            lengths.append(np.ones(n, dtype=np.int64))
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
            _, lens = _list_parts(_column(table, q.columns[0]))
            idx, new_lens = keep_newest(lens, q.max_len)
            for feat in q.features:
                flat, _ = _list_parts(_column(table, q.column(feat)))
                s_values.append(_ids(flat, feat.raw_type)[idx])
                s_lengths.append(new_lens)
        sequences = KeyedJaggedTensor(
            keys=schema.sequence_columns,
            values=torch.from_numpy(np.concatenate(s_values)),
            lengths=torch.from_numpy(np.concatenate(s_lengths)),
            stride=n,
        )
    users = _column(table, schema.user_id)
    return Batch(
        dense=torch.from_numpy(_floats(table, schema.dense_names)),
        fields=fields,
        sequences=sequences,
        labels=torch.from_numpy(_floats(table, list(schema.labels)) if with_labels
                                else np.zeros((n, len(schema.labels)), dtype=np.float32)),
        user_ids=torch.from_numpy(np.array(_ids(users, schema.user_id_type))),
        weights=torch.from_numpy(weights),
    )
