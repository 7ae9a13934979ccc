"""Requests: rows of a log (or a serving request) that share a ``request_id`` are the candidates
of one request — one user, one context, one history, several candidate items.

Shared-prefix scoring (``model.candidates``) computes a request's prefix once from its first row,
so every row of a request must carry the same request-level values (everything but the candidate
columns: ``FeatureSchema.candidate_columns``). A request whose rows disagree is never scored from
one row's prefix: ``group_requests`` flags all of its rows with a reason naming the columns (the
score job quarantines them, serving answers HTTP 400).

Columnar, no per-row Python: rows are hashed per column set (``pipeline.validate.row_hashes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedding.schema import FeatureSchema
from pipeline.row_hash import _column_words, row_hashes
from pipeline.validate import REQUEST_ID


def request_level_columns(schema: FeatureSchema, target_groups: tuple[str, ...]) -> list[str]:
    """What every row of a request must share: the user id, the non-candidate sparse fields, the
    request-level dense features, the sequence columns."""
    candidate = set(schema.candidate_columns(target_groups))
    cols = ([schema.user_id] + [f.name for f in schema.sparse if f.name not in candidate]
            + [f.name for f in schema.dense if f.name not in candidate] + schema.sequence_columns)
    return list(dict.fromkeys(cols))


@dataclass(frozen=True)
class Requests:
    """Rows grouped by request, requests in order of first appearance.

    order    [N] row indices, the rows of request 0 first (in table order), then request 1, …
    counts   [R] rows per request (sums to N)
    first    [R] the row each request's prefix is read from (its first row)
    bad      [N] per table row: its request's rows disagree on a request-level column
    reasons  per bad request id: the reason
    """

    order: np.ndarray
    counts: np.ndarray
    first: np.ndarray
    bad: np.ndarray
    reasons: dict[object, str]


def group_requests(table: pa.Table, schema: FeatureSchema, target_groups: tuple[str, ...],
                   column: str = REQUEST_ID) -> Requests:
    """Group ``table``'s rows by ``column`` and check each request's request-level columns.

    Raises ``KeyError`` if ``column`` is missing. A row with a null id is a request of its own.
    A request whose rows disagree has every row flagged in ``bad`` with a reason naming the
    differing columns; it still appears in ``order``/``counts`` (callers drop it)."""
    ids = table.column(column)
    ids = ids.chunk(0) if ids.num_chunks == 1 else ids.combine_chunks()
    if pa.types.is_null(ids.type):  # e.g. JSON nulls only: every row a request of its own
        null, words = np.ones(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.uint64)
    else:
        null = ids.is_null().to_numpy(zero_copy_only=False) if ids.null_count else np.zeros(len(ids), dtype=bool)
        words = _column_words(ids)
    key = np.empty(len(ids), dtype=[("null", "u1"), ("word", "u8")])
    # null: a request alone (uint64 both sides: mixed with int64 NumPy would go through float64
    # and merge ids above 2^53)
    key["null"], key["word"] = null, np.where(null, np.arange(len(ids), dtype=np.uint64), words)
    _, first_idx, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first_idx, kind="stable"), kind="stable")  # group → order of appearance
    group = rank[inverse]
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=len(first_idx))
    first = np.sort(first_idx)
    cols = request_level_columns(schema, target_groups)
    h = row_hashes(table, cols)
    differs = h != h[first[group]]
    bad_group = np.zeros(len(counts), dtype=bool)
    bad_group[group[differs]] = True
    reasons = {}
    for g in np.flatnonzero(bad_group):
        rows = np.flatnonzero(group == g)
        sub = table.take(pa.array(rows))
        names = [c for c in cols if len(np.unique(row_hashes(sub, [c]))) > 1]
        rid = ids[int(first[g])].as_py()
        reasons[rid] = (f"request '{column}'={rid}: its {len(rows)} rows disagree on request-level column(s) "
                        f"{names}; every candidate row of a request must carry the "
                        f"same user, context, request-level dense and history values")
    return Requests(order=order, counts=counts, first=first, bad=bad_group[group], reasons=reasons)
