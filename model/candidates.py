"""Shared-prefix candidate scoring: one user prefix, many candidates (HSTU's M-FALCON, OneTrans's
cross-request KV cache), exact for the TokenFormer stream.

Shapes: R requests, N candidates (all requests together), C_r candidates of request r, P prefix
tokens, T target tokens per candidate, H heads, E head dim, D model dim.

The stream is causal and only the T target tokens depend on the candidate, so for one request the
prefix ``[fields | dense | <sep> | behaviours | <sep>]`` has the same states in every layer for
every candidate. ``score_candidates`` runs the prefix once per request, keeps each layer's keys
and values (after RoPE), and runs each candidate's target tokens as queries over
``[that request's cached prefix | its own target tokens]`` with the same causal window mask as
the per-row stream — never another candidate's tokens. The receptive-field plan of the whole
stream (``TokenFormer.plan``) says how many trailing prefix and target rows each layer needs.

Jagged layout, e.g. 2 requests with 3 and 1 candidates::

    prefix inputs   rows r = 0, 1                 (dense_RDd, sparse_R)
    candidates      rows n = 0, 1, 2 | 3          (fields_NFD, dense_NDd)
    counts_R        [3, 1]                        request of candidate n: [0, 0, 0, 1]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.attention import attention, causal_mask

if TYPE_CHECKING:
    from model.sparse import SparseOutput
    from model.tokenformer import TokenFormer


def prefix_candidate_attention(q_NHQE: torch.Tensor, kp_RHKE: torch.Tensor, vp_RHKE: torch.Tensor,
                               key_valid_RK: torch.Tensor, request_N: torch.Tensor | None,
                               kt_NHTE: torch.Tensor, vt_NHTE: torch.Tensor, window: int | None) -> torch.Tensor:
    """Attention of each candidate's last Q target rows over its request's prefix keys (Kp rows)
    and its own T target keys, as the causal (windowed) stream ``[prefix | targets]`` would give
    (``model.attention`` semantics, end-aligned queries). ``request_N=None``: one request (R = 1),
    whose prefix keys are read in place instead of copied per candidate. → [N, H, Q, E]."""
    N, H, Q, E = q_NHQE.shape
    Kp, T = kp_RHKE.shape[2], kt_NHTE.shape[2]
    if request_N is None:  # [N, H, Q, E] → [H, N·Q, E] against [H, E, Kp]: no per-candidate copy
        s_p = (q_NHQE.transpose(0, 1).reshape(H, N * Q, E) @ kp_RHKE[0].transpose(-1, -2))
        s_p = s_p.view(H, N, Q, Kp).transpose(0, 1)
        valid_p = key_valid_RK  # [1, Kp]: one mask, broadcast over the candidates
    else:
        s_p = q_NHQE @ kp_RHKE[request_N].transpose(-1, -2)
        valid_p = key_valid_RK[request_N]
    scores = torch.cat([s_p, q_NHQE @ kt_NHTE.transpose(-1, -2)], dim=-1) * (1.0 / math.sqrt(E))
    mask = causal_mask(F.pad(valid_p, (0, T), value=True), window, Q)  # N (or 1) 1 Q Kp+T
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    p_p, p_t = probs[..., :Kp], probs[..., Kp:]
    if request_N is None:
        a_p = (p_p.transpose(0, 1).reshape(H, N * Q, Kp) @ vp_RHKE[0]).view(H, N, Q, E).transpose(0, 1)
    else:
        a_p = p_p @ vp_RHKE[request_N]
    return a_p + p_t @ vt_NHTE


class PrefixCache:
    """Per layer, the prefix keys/values [R, H, Kp_l, E] and their validity [R, Kp_l], and the
    target positions [R, 1] (newest behaviour + 1) — what one request contributes to any
    number of its candidates. ``TokenFormer.prefix_passes`` counts the requests computed."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], target_pos_R1: torch.Tensor,
                 plan: list[tuple[int, int]]):
        self.layers, self.target_pos_R1, self.plan = layers, target_pos_R1, plan


@torch.no_grad()
def build_prefix_cache(tower: TokenFormer, dense_RDd: torch.Tensor, sparse_R: SparseOutput) -> PrefixCache:
    """Run the request-level prefix through every layer once, keeping what candidates read."""
    x, pos, valid, newest, _ = tower.prefix_tokens(dense_RDd, sparse_R)
    T = tower.num_target_tokens
    cache, plan = [], tower.plan(x.shape[1] + T, trimmed=True)
    for layer, (keys, queries) in zip(tower.layers, plan):
        kp, qp = max(keys - T, 0), max(queries - T, 0)  # prefix rows among the layer's keys / queries
        x = x.to(_dtype(layer))  # bf16 blocks (FSDP2 mixed precision) read bf16 inputs
        x, pos, valid = x[:, x.shape[1] - kp:], pos[:, pos.shape[1] - kp:], valid[:, valid.shape[1] - kp:]
        k, v = layer.keys_values(x, pos)
        cache.append((k, v, valid))
        if qp:  # prefix rows the layer above reads: they see the prefix only (causal)
            q = layer.queries(x[:, kp - qp:], pos[:, kp - qp:])
            x = layer.feed_forward(layer.mix(x[:, kp - qp:], attention(layer.kernel, q, k, v, valid, layer.window)))
        else:
            x = x[:, :0]
    tower.prefix_passes += dense_RDd.shape[0]
    return PrefixCache(cache, newest + 1, plan)


@torch.no_grad()
def score_with_cache(tower: TokenFormer, cache: PrefixCache, fields_NFD: torch.Tensor, dense_NDd: torch.Tensor,
                     request_N: torch.Tensor | None) -> torch.Tensor:
    """Logits [N, num_tasks] of candidates against a cache (``request_N``: each candidate's
    request, or None for a one-request cache)."""
    h = tower.target_tokens(fields_NFD, dense_NDd)  # N T D
    T = h.shape[1]
    tpos = cache.target_pos_R1 if request_N is None else cache.target_pos_R1[request_N]
    tpos = tpos.expand(-1, T)  # [1, T] for one request: RoPE tables once, broadcast over candidates
    for layer, (keys, queries), (kp, vp, valid_p) in zip(tower.layers, cache.plan, cache.layers):
        kt, qt = min(keys, T), min(queries, T)
        h, tpos = h[:, h.shape[1] - kt:].to(_dtype(layer)), tpos[:, tpos.shape[1] - kt:]
        k, v = layer.keys_values(h, tpos)
        q = layer.queries(h[:, kt - qt:], tpos[:, kt - qt:])
        a = prefix_candidate_attention(q, kp, vp, valid_p, request_N, k, v, layer.window)
        h = layer.feed_forward(layer.mix(h[:, kt - qt:], a))
    return tower.head(tower.final_norm(h[:, -1].to(_dtype(tower.head))))


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its weights' (bfloat16 for blocks under FSDP2's mixed
    precision, whose hooks cast inputs only when the block itself is called)."""
    return next(module.parameters()).dtype


def score_candidates(tower: TokenFormer, dense_RDd: torch.Tensor, sparse_R: SparseOutput,
                     fields_NFD: torch.Tensor, dense_NDd: torch.Tensor, counts_R: torch.Tensor,
                     chunk_size: int = 1024) -> torch.Tensor:
    """Logits [N, num_tasks] of N candidates grouped into R requests (``counts_R`` [R], jagged,
    0 allowed), equal to scoring each candidate's full row. Request-level inputs come from the R
    prefix rows, candidate-level ones (target-group fields, candidate-level dense) from the N
    candidate rows. Candidates are scored ``chunk_size`` at a time (bounded memory).

    Raises ``ValueError`` if ``counts_R`` does not match the rows given."""
    R, N = dense_RDd.shape[0], fields_NFD.shape[0]
    if counts_R.shape != (R,) or int(counts_R.sum()) != N or bool((counts_R < 0).any()):
        raise ValueError(f"score_candidates: counts {counts_R.tolist()} must be {R} non-negative numbers "
                         f"summing to the {N} candidate rows")
    cache = build_prefix_cache(tower, dense_RDd, sparse_R)
    request_N = None if R == 1 else torch.repeat_interleave(torch.arange(R, device=counts_R.device), counts_R)
    out = [score_with_cache(tower, cache, fields_NFD[s:s + chunk_size], dense_NDd[s:s + chunk_size],
                            None if request_N is None else request_N[s:s + chunk_size])
           for s in range(0, N, chunk_size)]
    return torch.cat(out) if out else tower.head.weight.new_zeros(0, tower.head.out_features)


def expand_requests(dense_RDd: torch.Tensor, sparse_R: SparseOutput, fields_NFD: torch.Tensor,
                    dense_NDd: torch.Tensor, counts_R: torch.Tensor, candidate_fields: torch.Tensor,
                    candidate_dense: torch.Tensor) -> tuple[torch.Tensor, SparseOutput]:
    """The N full rows of R requests × their candidates, for row-by-row scoring (the reference of
    shared-prefix scoring, and the path of towers without a cache): request-level inputs repeated
    from the prefix rows, the ``candidate_fields`` / ``candidate_dense`` columns (index tensors)
    from the candidate rows → (dense_NDd, sparse_N)."""
    from model.sparse import SparseOutput

    req = torch.repeat_interleave(torch.arange(dense_RDd.shape[0], device=counts_R.device), counts_R)
    dense, fields = dense_RDd[req].clone(), sparse_R.fields_BFD[req].clone()
    dense[:, candidate_dense] = dense_NDd[:, candidate_dense]
    fields[:, candidate_fields] = fields_NFD[:, candidate_fields]
    return dense, SparseOutput(fields_BFD=fields, sequences=[(x[req], n[req]) for x, n in sparse_R.sequences],
                               sequence_features=[{k: v[req] for k, v in f.items()}
                                                  for f in sparse_R.sequence_features])
