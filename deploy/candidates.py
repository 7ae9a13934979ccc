"""Serving many candidates of one request: the shared-prefix inference program and request scoring.

An export of a TokenFormer-family model with a cache path (``TokenFormer.score_candidates``) holds
a second program, ``candidates.pt2``: ``CandidateInferenceModule`` captured by ``torch.export``
with one request's prefix (1 row) and a dynamic number C ≥ 2 of candidate rows::

    prefix  dense [1, Dd], field_values [Nf], field_lengths [F], seq_values [Ns], seq_lengths [Cs]
    cands   dense [C, Dd], field_values [Mf], field_lengths [F·C]
    → probabilities [C, T]

The request's prefix (user and context fields, request-level dense, history) runs once; each
candidate's target tokens attend to its cached keys and values (``model.candidates``). Rows with a
``request_id`` are grouped (``pipeline.requests``): each request is one call of the program, its
candidates in micro-batches of at most ``CANDIDATE_CHUNK``; rows without one go through the
per-row program (``model.pt2``). Towers without a cache path keep the per-row program only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.export import Dim
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.schema import FeatureSchema
from model.blocks import UnifiedInteractionBlock
from model.candidates import build_prefix_cache, score_with_cache
from model.ranking import RankingModel
from model.tokenformer import TokenFormer
from pipeline.collate import collate
from pipeline.requests import group_requests

CANDIDATE_CHUNK = 1024  # candidates per program call (bounded memory for very large requests)


def has_candidate_path(model: RankingModel) -> bool:
    """Whether the tower scores candidates against a cached prefix (TokenFormer with UIB blocks)."""
    tower = model.tower
    return isinstance(tower, TokenFormer) and isinstance(tower.layers[0], UnifiedInteractionBlock)


class CandidateInferenceModule(nn.Module):
    """One request's prefix row and its C candidate rows → probabilities [C, T] (module docstring)."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        if not has_candidate_path(model):
            raise ValueError(f"the {model.cfg.tower} tower has no shared-prefix path; serve it row by row")
        self.model = model
        self.field_keys = list(model.schema.field_names)
        self.seq_keys = [c for q in model.schema.sequences for c in q.columns]

    def forward(self, dense: torch.Tensor, field_values: torch.Tensor, field_lengths: torch.Tensor,
                seq_values: torch.Tensor, seq_lengths: torch.Tensor, cand_dense: torch.Tensor,
                cand_field_values: torch.Tensor, cand_field_lengths: torch.Tensor) -> torch.Tensor:
        arch, tower = self.model.sparse_arch, self.model.tower
        sparse_R = arch(KeyedJaggedTensor(keys=self.field_keys, values=field_values, lengths=field_lengths),
                        KeyedJaggedTensor(keys=self.seq_keys, values=seq_values, lengths=seq_lengths))
        fields_N = arch.pooled_fields(KeyedJaggedTensor(keys=self.field_keys, values=cand_field_values,
                                                        lengths=cand_field_lengths))
        cache = build_prefix_cache(tower, dense, sparse_R)
        return torch.sigmoid(score_with_cache(tower, cache, fields_N, cand_dense, None))


def _example(schema: FeatureSchema, candidates: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    f_len = torch.tensor([2 if f.multi_valued else 1 for f in schema.sparse])
    c_len = torch.tensor([1 + (r % 2 if f.multi_valued else 0) for f in schema.sparse for r in range(candidates)])
    s_len = torch.tensor([3 for q in schema.sequences for _ in q.columns], dtype=torch.int64)
    return (torch.randn(1, len(schema.dense), generator=g), torch.randint(0, 1000, (int(f_len.sum()),), generator=g),
            f_len, torch.randint(0, 1000, (int(s_len.sum()),), generator=g), s_len,
            torch.randn(candidates, len(schema.dense), generator=g),
            torch.randint(0, 1000, (int(c_len.sum()),), generator=g), c_len)


def export_candidate_program(model: RankingModel) -> torch.export.ExportedProgram:
    """``torch.export`` of ``CandidateInferenceModule``; the candidate count and id counts are
    dynamic (C ≥ 2: ``score_request`` pads a single candidate)."""
    module = CandidateInferenceModule(model).eval()
    dyn = [None, {0: Dim.AUTO}, None, {0: Dim.AUTO}, None, {0: Dim.AUTO}, {0: Dim.AUTO}, {0: Dim.AUTO}]
    with torch.no_grad():
        return torch.export.export(module, _example(model.schema), dynamic_shapes=dyn, strict=False)


def load_candidate_program(export_dir: str | Path) -> tuple[nn.Module | None, tuple[str, ...]]:
    """The export's shared-prefix program (None when the tower has none) and the candidate token
    groups it was built with (``tokenformer.target_groups``)."""
    export_dir = Path(export_dir)
    doc = json.loads((export_dir / "config.json").read_text())
    groups = tuple(doc["model"].get("tokenformer", {}).get("target_groups", ("item",)))
    path = export_dir / "candidates.pt2"
    return (torch.export.load(path).module() if path.exists() else None), groups


def score_request(program: nn.Module, prefix: pa.Table, candidates: pa.Table, schema: FeatureSchema,
                  chunk: int = CANDIDATE_CHUNK, row_program: nn.Module | None = None) -> np.ndarray:
    """One request: its prefix row and C candidate rows (canonical layout) → probabilities [C, T].

    The program is traced with a history; a prefix with fewer than 2 history ids in all (a
    cold-start user: ``torch.export`` specializes sizes 0 and 1) is scored row by row with
    ``row_program`` (``model.pt2``), or raises ``ValueError`` without one."""
    p = collate(prefix, schema, with_labels=False)
    if p.sequences.values().numel() < 2:
        if row_program is None:
            raise ValueError("score_request: a prefix with an empty history needs the per-row program")
        from deploy.export import score_table  # deploy.export imports this module

        return score_table(row_program, candidates, schema)
    head = (p.dense, p.fields.values(), p.fields.lengths(), p.sequences.values(), p.sequences.lengths())
    out = []
    for lo in range(0, candidates.num_rows, chunk):
        part = candidates.slice(lo, chunk)
        n = part.num_rows
        if n == 1:  # the program is traced for >= 2 candidates
            part = pa.concat_tables([part, part])
        c = collate(part, schema, with_labels=False)
        with torch.no_grad():
            out.append(program(*head, c.dense, c.fields.values(), c.fields.lengths())[:n].numpy())
    return np.concatenate(out)


def score_requests(program: nn.Module, row_program: nn.Module, table: pa.Table, schema: FeatureSchema,
                   target_groups: tuple[str, ...], request_ids: pa.ChunkedArray | pa.Array
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rows of several requests (``request_ids``, one per row of ``table``; null: a row alone) →
    (probabilities [rows, T] in table order, bad [rows] for requests whose rows disagree on a
    request-level column, reasons by request id). Requests of two or more rows go through the
    shared-prefix ``program``, one call each; single rows all together through the per-row
    ``row_program`` (``deploy.export.score_table``). Bad rows are not scored (NaN)."""
    from deploy.export import score_table  # deploy.export imports this module

    groups = group_requests(table.append_column("request_id", request_ids), schema, target_groups)
    probs = np.full((table.num_rows, len(schema.labels)), np.nan, dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(groups.counts)[:-1]]).astype(np.int64)
    singles = groups.order[starts[(groups.counts == 1) & ~groups.bad[groups.first]]]
    if len(singles):
        probs[singles] = score_table(row_program, table.take(pa.array(singles)), schema)
    for start, count, first in zip(starts, groups.counts, groups.first):
        if count < 2 or groups.bad[first]:
            continue
        rows = groups.order[start:start + count]
        probs[rows] = score_request(program, table.slice(int(first), 1), table.take(pa.array(rows)), schema,
                                    row_program=row_program)
    return probs, groups.bad, groups.reasons
