"""Row hashing: a 64-bit word per row over chosen columns (``row_hashes``), used to find exact
duplicate rows within a file (``DuplicateFinder``) and to compare a request's request-level
columns (``pipeline.requests``). Numpy only; tables are expected normalised
(``pipeline.validate.normalize``); strings are hashed as bytes, so invalid UTF-8 hashes too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.validate import REQUEST_ID, SOURCE, _binary_values, _is_list, _np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, vectorized: 64 well-spread bits from any 64-bit word."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _column_words(arr: pa.Array) -> np.ndarray:
    """One uint64 word per row that is equal exactly when the values are equal (nulls apart:
    ``row_hashes`` overwrites them); a list's word folds its length and each element's word
    mixed with its position (equal lists, equal words; a reordered list, another word)."""
    if _is_list(arr.type):
        lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(arr)
        flat = flat.chunk(0) if isinstance(flat, pa.ChunkedArray) and flat.num_chunks == 1 else flat
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        with np.errstate(over="ignore"):
            pos = (np.arange(int(lens.sum())) - np.repeat(starts, lens) + 1).astype(np.uint64)
            elem = _mix(_column_words(flat if isinstance(flat, pa.Array) else flat.combine_chunks()) + pos * _M2)
            out = lens.astype(np.uint64) * _M1
            nonempty = lens > 0
            if nonempty.any():
                out[nonempty] += np.add.reduceat(elem, starts[nonempty])
        return out
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):  # as bytes: invalid UTF-8 too
        return pd.util.hash_array(np.array(_binary_values(arr.fill_null("")), dtype=object)
                                  if pa.types.is_string(arr.type)
                                  else arr.fill_null("").cast(pa.large_binary()).to_numpy(zero_copy_only=False))
    if arr.null_count:
        arr = arr.fill_null(0)
    if pa.types.is_floating(arr.type):
        return arr.to_numpy().astype(np.float64).view(np.uint64)
    values = arr.to_numpy()
    return values.view(np.uint64) if values.dtype == np.int64 else values.astype(np.int64).view(np.uint64)


def row_hashes(table: pa.Table, columns: list[str]) -> np.ndarray:
    """A 64-bit hash per row over ``columns``: each column's words are spread (multiply,
    xor-shift) and folded in order, a column's nulls hashed apart from any value, then the whole
    is finalized with ``_mix``. Numpy only, no pandas frame."""
    with np.errstate(over="ignore"):
        h = np.full(table.num_rows, 0x9E3779B97F4A7C15, dtype=np.uint64)
        for j, name in enumerate(columns):
            col = table.column(name)
            arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            word = (_column_words(arr) + np.uint64(2 * j + 1)) * _M1
            word ^= word >> np.uint64(31)
            if arr.null_count:
                word[_np(arr.is_null())] = np.uint64(0xD6E8FEB86659FD93) + np.uint64(j)
            h ^= word
            h *= _M2
            h ^= h >> np.uint64(29)
        return _mix(h)


class DuplicateFinder:
    """Rows equal, in every single-valued column, to an earlier row of the same file (a logging
    double-fire: same user, timestamp, item, features and label; the behaviour sequence of a
    user at a timestamp is then the same too). One finder per file; blocks in file order.
    Rows are compared by a 64-bit hash (``row_hashes``): at 10^6 rows a file, two different rows
    share one with odds of about 3 in 10^8."""

    def __init__(self) -> None:
        self.seen = np.empty(0, dtype=np.uint64)  # row hashes of the file so far, sorted

    def __call__(self, table: pa.Table) -> np.ndarray:
        cols = [c for c in table.column_names  # request ids aside: the same rule with and without them
                if c not in (SOURCE, REQUEST_ID) and not _is_list(table.schema.field(c).type)]
        if not cols or table.num_rows == 0:
            return np.zeros(table.num_rows, dtype=bool)
        h = row_hashes(table, cols)
        order = np.argsort(h, kind="stable")  # one sort: repeats in the block and membership
        hs = h[order]
        dup_sorted = np.zeros(len(hs), dtype=bool)
        dup_sorted[1:] = hs[1:] == hs[:-1]  # all but the first of a repeat within the block
        if len(self.seen):  # binary search in what was seen, no re-sort of it
            at = np.searchsorted(self.seen, hs)
            dup_sorted |= self.seen[np.minimum(at, len(self.seen) - 1)] == hs
        new = hs[~dup_sorted]
        self.seen = np.insert(self.seen, np.searchsorted(self.seen, new), new)
        dup = np.empty(len(h), dtype=bool)
        dup[order] = dup_sorted
        return dup
