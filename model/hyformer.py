"""HyFormer (ByteDance, arXiv 2601.12681): one backbone that alternates *query decoding* (global
queries read each behaviour sequence) and *query boosting* (RankMixer token mixing over queries
and non-sequential tokens), layer by layer.

Shapes: B batch, S sequences, N queries per sequence, M non-sequential (NS) tokens,
T = N·S + M tokens, D model dim, L behaviour slots, De embedding dim.

* NS tokens: RankMixer's semantic grouping — the fields of each schema ``group`` (in order of
  first appearance) concatenated → their own linear map to D; the dense features are one more
  group. The target item's fields are NS tokens like any other.
* Queries, generated once: ``GlobalInfo = [F_1 … F_M, MeanPool(seq_1) … MeanPool(seq_S)]``
  (flattened), ``Q_s = [FFN_s1(GlobalInfo) … FFN_sN(GlobalInfo)]``.
* Per layer l and sequence s: ``H_l = Enc_l(H_{l−1})`` (``H_0`` = the sequence projected to D)
  with ``Enc`` one of ``full`` (a pre-norm Transformer encoder layer), ``longer`` (the newest
  ``recent_window`` behaviours cross-attend over all of ``H_{l−1}``, then a FFN; the output has
  ``recent_window`` tokens) or ``swiglu`` (``H + SwiGLU(RMSNorm H)``, no attention). Query decoding:
  ``Q_s ← Q_s + MHA(LN Q_s, K = H_l W_K, V = H_l W_V)`` over the non-padding behaviours.
* Query boosting over ``X = [Q_1 … Q_S, F_1 … F_M]``: ``X ← X + PerTokenFFN(LN(TokenMix(X)))``
  (``model.rankmixer.token_mix``: token h gathers chunk h of every token; T must divide D). The
  first N·S tokens are the next layer's queries, the last M its NS tokens.
* Head: the final T tokens flattened → MLP → one logit per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embedding.schema import FeatureSchema
from model.blocks import RMSNorm, SwiGLU
from model.rankmixer import PerTokenFFN, token_mix
from model.sparse import SparseOutput
from model.tokenformer import right_align

ENCODERS = ("full", "longer", "swiglu")


@dataclass(frozen=True, kw_only=True)
class HyFormerConfig:
    d_model: int = 64  # token width D
    num_layers: int = 2  # HyFormer layers (query decoding + query boosting)
    queries_per_sequence: int = 1  # N
    encoder: str = "full"  # sequence K/V encoder: full | longer | swiglu
    recent_window: int = 8  # longer: the newest K behaviours are the queries
    num_heads: int = 2  # attention heads
    ffn_mult: int = 4  # per-token FFN and encoder FFN hidden = ffn_mult · D
    head_hidden: int = 256  # hidden size of the output MLP over the final queries

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"hyformer.encoder: '{self.encoder}' is not one of {ENCODERS}")
        if self.d_model % self.num_heads:
            raise ValueError(f"hyformer: num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        for key in ("num_layers", "queries_per_sequence", "recent_window", "ffn_mult", "head_hidden"):
            if getattr(self, key) <= 0:
                raise ValueError(f"hyformer.{key}: must be positive")


def semantic_groups(schema: FeatureSchema) -> list[list[int]]:
    """Field indices per schema ``group``, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(schema.sparse):
        groups.setdefault(f.group, []).append(i)
    return list(groups.values())


def _attend_mask(valid_BL: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` (True = ignore); a row without any behaviour attends to its padding
    (zeros) instead of producing NaN."""
    pad = ~valid_BL
    return pad & ~pad.all(1, keepdim=True)


class FullEncoder(nn.Module):
    def __init__(self, d: int, cfg: HyFormerConfig) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, cfg.num_heads, cfg.ffn_mult * d, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def forward(self, h_BLD, valid_BL):
        return self.layer(h_BLD, src_key_padding_mask=_attend_mask(valid_BL)), valid_BL


class LongerLayer(nn.Module):
    """The newest ``recent_window`` tokens cross-attend over all of them (O(K·L)), then a FFN."""

    def __init__(self, d: int, cfg: HyFormerConfig) -> None:
        super().__init__()
        self.k = cfg.recent_window
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))

    def forward(self, h_BLD, valid_BL):  # h right-aligned: the newest last
        k = min(self.k, h_BLD.shape[1])
        q, q_valid = h_BLD[:, -k:], valid_BL[:, -k:]
        kv = self.norm_kv(h_BLD)
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=_attend_mask(valid_BL), need_weights=False)[0]
        return q + self.ffn(self.norm_ffn(q)), q_valid


class SwiGLUEncoder(nn.Module):
    def __init__(self, d: int, cfg: HyFormerConfig) -> None:
        super().__init__()
        self.norm, self.ffn = RMSNorm(d), SwiGLU(d, cfg.ffn_mult * d)

    def forward(self, h_BLD, valid_BL):
        return h_BLD + self.ffn(self.norm(h_BLD)), valid_BL


ENCODER_LAYERS = {"full": FullEncoder, "longer": LongerLayer, "swiglu": SwiGLUEncoder}


class QueryDecoder(nn.Module):
    """Multi-head cross-attention of one sequence's N queries over its layer-l keys/values
    (``nn.MultiheadAttention`` holds W_Q, W_K, W_V, W_O), pre-norm, residual."""

    def __init__(self, d: int, cfg: HyFormerConfig) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)

    def forward(self, q_BND, h_BLD, valid_BL):
        kv = self.norm_kv(h_BLD)
        a = self.attn(self.norm_q(q_BND), kv, kv, key_padding_mask=_attend_mask(valid_BL), need_weights=False)[0]
        return q_BND + a


class QueryBooster(nn.Module):
    """``X + PerTokenFFN(LN(TokenMix(X)))`` over the T tokens."""

    def __init__(self, num_tokens: int, d: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn = PerTokenFFN(num_tokens, d, ffn_mult * d)

    def forward(self, x_BTD):
        return x_BTD + self.ffn(self.norm(token_mix(x_BTD)))


class HyFormerTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: HyFormerConfig, emb_dim: int, num_tasks: int) -> None:
        super().__init__()
        if not schema.sequences:
            raise ValueError("hyformer reads behaviour sequences; the schema has none")
        d, S, N = cfg.d_model, len(schema.sequences), cfg.queries_per_sequence
        self.cfg, self.S, self.N = cfg, S, N
        self.groups = semantic_groups(schema)
        self.num_dense = len(schema.dense)
        self.ns_proj = nn.ModuleList(nn.Linear(len(g) * emb_dim, d) for g in self.groups)
        if self.num_dense:
            self.ns_proj.append(nn.Linear(self.num_dense, d))
        M = len(self.ns_proj)
        self.M, self.T = M, N * S + M
        if d % self.T:
            raise ValueError(
                f"hyformer: token mixing needs T = N·S + M = {N}·{S} + {M} = {self.T} to divide d_model "
                f"({d}); change model.hyformer.d_model, queries_per_sequence or the schema's field groups")
        self.seq_proj = nn.ModuleList(nn.Linear(emb_dim, d) for _ in range(S))
        hidden = d
        self.query_in = nn.Linear((M + S) * d, S * N * hidden)
        self.query_out = nn.Parameter(torch.randn(S * N, hidden, d) / math.sqrt(hidden))
        self.query_out_b = nn.Parameter(torch.zeros(S * N, d))
        self.encoders = nn.ModuleList(
            nn.ModuleList(ENCODER_LAYERS[cfg.encoder](d, cfg) for _ in range(S)) for _ in range(cfg.num_layers))
        self.decoders = nn.ModuleList(
            nn.ModuleList(QueryDecoder(d, cfg) for _ in range(S)) for _ in range(cfg.num_layers))
        self.boosters = nn.ModuleList(QueryBooster(self.T, d, cfg.ffn_mult) for _ in range(cfg.num_layers))
        self.head = nn.Sequential(nn.LayerNorm(self.T * d), nn.Linear(self.T * d, cfg.head_hidden), nn.GELU(),
                                  nn.Linear(cfg.head_hidden, num_tasks))

    def ns_tokens(self, dense_BDd: torch.Tensor, fields_BFD: torch.Tensor) -> torch.Tensor:
        toks = [proj(fields_BFD[:, g].flatten(1)) for proj, g in zip(self.ns_proj, self.groups)]
        if self.num_dense:
            toks.append(self.ns_proj[-1](dense_BDd))
        return torch.stack(toks, dim=1)  # B M D

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput, return_states: bool = False):
        """Logits; with ``return_states`` also, per layer, the sequence-token states ``H_l`` of
        all sequences side by side and their validity (for ``model.diagnostics``)."""
        B = dense_BDd.shape[0]
        ns_BMD = self.ns_tokens(dense_BDd, sparse.fields_BFD)
        hs, valids, pooled = [], [], []
        for proj, (x_BLDe, lengths_B) in zip(self.seq_proj, sparse.sequences):
            L = x_BLDe.shape[1]
            # right-aligned (newest last) so that LONGER's recent window is the last K slots
            h_BLD = proj(right_align(x_BLDe, lengths_B))
            valid_BL = torch.arange(L, device=h_BLD.device)[None] >= (L - lengths_B[:, None])
            hs.append(h_BLD)
            valids.append(valid_BL)
            keep = valid_BL[..., None].float()
            pooled.append((h_BLD * keep).sum(1) / keep.sum(1).clamp(min=1))
        global_BG = torch.cat([ns_BMD.flatten(1)] + pooled, dim=1)
        hidden = F.gelu(self.query_in(global_BG)).view(B, self.S * self.N, -1)
        q_BQD = torch.einsum("bqh,qhd->bqd", hidden, self.query_out) + self.query_out_b
        states = []
        for encoders, decoders, booster in zip(self.encoders, self.decoders, self.boosters):
            decoded = []
            for s in range(self.S):
                hs[s], valids[s] = encoders[s](hs[s], valids[s])
                decoded.append(decoders[s](q_BQD[:, s * self.N:(s + 1) * self.N], hs[s], valids[s]))
            x_BTD = booster(torch.cat(decoded + [ns_BMD], dim=1))
            q_BQD, ns_BMD = x_BTD[:, : self.S * self.N], x_BTD[:, self.S * self.N:]
            if return_states:
                states.append((torch.cat(hs, dim=1), torch.cat(valids, dim=1)))
        logits = self.head(torch.cat([q_BQD, ns_BMD], dim=1).flatten(1))
        return (logits, states) if return_states else logits
