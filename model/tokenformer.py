"""TokenFormer ("Unify the Multi-Field and Sequential Recommendation Worlds", Tencent 2026).

One causal token stream per row::

    [ field tokens | <sep> | behaviour tokens (newest last) | <sep> | target tokens ]
      RoPE pos 0      0      1 .. n  (n real behaviours)      n+1      n+1

Behaviours are right-aligned (padding first, masked as keys) so the newest behaviour sits next to
the target, where the sliding windows of the top layers look. Unified Interaction Block (UIB),
pre-RMSNorm::

    A  = Attn(RMSNorm(X))                 causal; full in the bottom layers, sliding on top (BFTS)
    Ĩ  = σ(X W_g + b) ⊙ A                 NLIR gate from the block input, W_g = 0 at init
    I  = X + Ĩ
    X' = I + SwiGLU(RMSNorm(I))

After the full layers the field tokens and the first separator are dropped (the behaviour and
target tokens have read them). Readout: final RMSNorm on the last target token → per-task heads.

Layout (the paper's by default): one target token per target field (``target_tokens =
"feature"``; ``"group"``: one per token group), and event tokens that project the concatenation
of a behaviour's side-feature embeddings (``event_tokens = "concat"``; ``"sum"``: their sum).

Several behaviour sequences: their behaviour tokens follow one another between the separators,
each sequence right-aligned with its own projection and its own time indices 1..n_s; the targets
sit at max_s(n_s) + 1. The sliding windows count stream positions, so in the sliding layers the
targets see the last sequence's newest behaviours; earlier sequences reach them through the full
layers.

Shapes: B batch, F field tokens, L behaviour slots, T target tokens, S stream length,
D model dim, H heads, E head dim, De embedding dim, K fields per field token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from embedding.schema import FeatureSchema
from model import candidates
from model.attention import KERNELS, default_kernel
from model.blocks import BLOCKS, HSTUBlock, RMSNorm

if TYPE_CHECKING:  # the tower itself needs only torch: benchmarks run it where TorchRec is absent
    from model.sparse import SparseOutput

MODES = ("new_impression", "user_centric")


@dataclass(frozen=True, kw_only=True)
class TokenFormerConfig:
    d_model: int = 64  # token width D
    num_heads: int = 4  # attention heads (D must divide by it)
    num_full_layers: int = 2  # BFTS: full-attention layers at the bottom
    windows: tuple[int, ...] = (32, 16)  # one per sliding layer above the full ones, shrinking
    schedule: str = ""  # BFTS shorthand "4F" | "3F1S" | "2F2S" | "1F3S" | "4S": sets num_full_layers and windows
    first_window: int = 32  # schedule: the S layers' windows are first_window, first_window/2, …
    nlir: bool = True  # the σ(X W_g + b) gate; False: plain residual I = X + A
    gate_bias: float = 0.0  # NLIR: the gate's initial bias b (σ(b) the initial gate value)
    drop_field_tokens: bool = True  # drop field tokens + first <sep> after the full layers
    num_field_tokens: int = 0  # 0: one per field up to 32 fields, else 32 tokens of grouped fields
    target_groups: tuple[str, ...] = ("item",)  # schema token groups that describe the target
    target_tokens: str = "feature"  # feature: one token per target field (the paper) | group: one per group
    event_tokens: str = "concat"  # concat: Linear(side features concatenated) (the paper) | sum: Linear(sum)
    ffn_hidden: int = 0  # SwiGLU hidden size; 0: 8/3 · d_model rounded up to a multiple of 8
    attention_kernel: str = "auto"  # auto | reference | sdpa | banded
    rope_theta: float = 10_000.0  # RoPE base frequency over the stream positions
    mode: str = "new_impression"  # user_centric: item tokens also predict the action that followed
    action_feature: str = "action"  # the sequence side feature holding the action (user_centric)
    action_loss_weight: float = 1.0  # user_centric: weight of the next-action loss beside the label loss
    action_positive_min: int = 1  # user_centric: an action is positive when its raw id >= this (ratings: 4)
    trim: bool = True  # new-impression: compute only the receptive field of the read-out (exact)
    # on the attention and FFN residual branches (training only); left out of a job config: the
    # tower's measured default (0.1 for naive_transformer and hstu, docs/daily.md)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule:
            full, windows = parse_schedule(self.schedule, self.first_window)
            object.__setattr__(self, "num_full_layers", full)
            object.__setattr__(self, "windows", windows)
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError("tokenformer: d_model / num_heads must be an even integer (RoPE pairs)")
        if self.num_full_layers < 0 or self.num_layers < 1:
            raise ValueError("tokenformer: need at least one layer and num_full_layers >= 0")
        if any(w < 1 for w in self.windows):
            raise ValueError(f"tokenformer.windows: every window must be >= 1, got {list(self.windows)}")
        if any(b > a for a, b in zip(self.windows, self.windows[1:])):
            raise ValueError(f"tokenformer.windows: must not grow layer by layer (shrinking is the paper's "
                             f"choice, uniform its ablation), got {list(self.windows)}")
        if self.target_tokens not in ("feature", "group"):
            raise ValueError(f"tokenformer.target_tokens: choose feature or group, got '{self.target_tokens}'")
        if self.event_tokens not in ("concat", "sum"):
            raise ValueError(f"tokenformer.event_tokens: choose concat or sum, got '{self.event_tokens}'")
        if self.attention_kernel not in ("auto", *KERNELS):
            raise ValueError(f"tokenformer.attention_kernel: choose auto or one of {KERNELS}")
        if self.mode not in MODES:
            raise ValueError(f"tokenformer.mode: choose one of {MODES}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"tokenformer.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def num_layers(self) -> int:
        return self.num_full_layers + len(self.windows)


def parse_schedule(schedule: str, first_window: int) -> tuple[int, tuple[int, ...]]:
    """``"2F2S"`` → (2, (w, w/2)); ``"4S"`` → (0, (w, w/2, w/4, w/8)); windows halve per layer."""
    m = re.fullmatch(r"(?:(\d+)F)?(?:(\d+)S)?", schedule)
    if not schedule or m is None:
        raise ValueError(f"tokenformer.schedule: expected like '2F2S', '4F' or '4S', got '{schedule}'")
    full, sliding = int(m.group(1) or 0), int(m.group(2) or 0)
    windows = tuple(first_window >> i for i in range(sliding))
    if any(w < 1 for w in windows):
        raise ValueError(f"tokenformer.schedule '{schedule}': first_window {first_window} is too small to "
                         f"halve {sliding} times")
    return full, windows


def naive_transformer(cfg: TokenFormerConfig) -> TokenFormerConfig:
    """The baseline TokenFormer is measured against: same stream and depth, full attention
    everywhere, no gate, no field-token dropping."""
    # schedule="" as well: replace() re-runs __post_init__, which would re-apply a BFTS schedule
    return replace(cfg, schedule="", num_full_layers=cfg.num_layers, windows=(), nlir=False,
                   drop_field_tokens=False)


def receptive_field_plan(stream_len: int, windows: list[int | None], drop_at: int | None = None,
                         num_dropped: int = 0, read_rows: int | None = 1) -> list[tuple[int, int]]:
    """Per layer ``(keys, queries)``: how many trailing rows of its input a layer must read and
    how many trailing rows it must produce so that the last ``read_rows`` rows of the top layer
    are exact (``read_rows=None``: every layer produces every row, the untrimmed stack).

    Walks back from the read-out: a layer with window w that must produce Q rows needs its last
    ``Q + w − 1`` input rows as keys (all of them for a full layer); those are the rows the layer
    below must produce. ``drop_at``: the layer before which the ``num_dropped`` leading rows
    (field tokens and the first separator) are removed. Only static ints go in, so the plan is
    static under ``torch.export``. The demo's 2F2S (32, 16) stream of 49 tokens, 15 dropped, one
    target token::

        >>> receptive_field_plan(49, [None, None, 32, 16], drop_at=2, num_dropped=15)
        [(49, 49), (49, 34), (34, 16), (16, 1)]
    """
    inputs = [stream_len - (num_dropped if drop_at is not None and i >= drop_at else 0)
              for i in range(len(windows))]
    plan, need = [], read_rows
    for w, n_in in zip(reversed(windows), reversed(inputs)):
        q = n_in if need is None else min(need, n_in)
        k = n_in if w is None or need is None else min(n_in, q + w - 1)
        plan.append((k, q))
        need = None if need is None else k  # untrimmed: every layer produces all its rows
    return plan[::-1]


def right_align(x_BLD: torch.Tensor, lengths_B: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Move each row's ``lengths`` leading items to the end: padding first, newest last.
    ``inverse=True`` moves them back to the front."""
    L = x_BLD.shape[1]
    slot = torch.arange(L, device=x_BLD.device)[None, :]
    shift = (L - lengths_B[:, None]).long()
    src = slot + shift if inverse else slot - shift
    valid = (src < L) if inverse else (src >= 0)
    out = torch.gather(x_BLD, 1, src.clamp(0, L - 1)[..., None].expand(-1, -1, x_BLD.shape[2]))
    return out * valid[..., None]


class TokenFormer(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: TokenFormerConfig, emb_dim: int, num_tasks: int,
                 device: torch.device | None = None, block: str = "uib") -> None:
        super().__init__()
        if not schema.sequences:
            raise ValueError("TokenFormer reads behaviour sequences; the schema has none")
        if cfg.mode == "user_centric" and len(schema.sequences) != 1:
            raise ValueError(f"tokenformer: the user-centric mode reads one sequence; the schema has "
                             f"{len(schema.sequences)}")
        self.cfg = cfg
        d = cfg.d_model
        groups = [f.group for f in schema.sparse]
        unknown = set(cfg.target_groups) - set(groups)
        if unknown:
            raise ValueError(f"tokenformer.target_groups: {sorted(unknown)} are not token groups of the schema")
        target_idx = [i for i, g in enumerate(groups) if g in cfg.target_groups]
        field_idx = [i for i, g in enumerate(groups) if g not in cfg.target_groups]
        if not target_idx:
            raise ValueError("tokenformer: no field belongs to target_groups; the stream needs a target")
        self.register_buffer("field_idx", torch.tensor(field_idx, dtype=torch.long), persistent=False)
        # field tokens: fields chunked in schema order, each chunk concat → its own linear
        n_fields = len(field_idx)
        n_tokens = cfg.num_field_tokens or (n_fields if n_fields <= 32 else 32)
        n_tokens = max(1, min(n_tokens, n_fields)) if n_fields else 0
        self.num_field_tokens = n_tokens
        self.fields_per_token = math.ceil(n_fields / n_tokens) if n_tokens else 0
        if n_tokens:
            k = self.fields_per_token * emb_dim
            self.field_w = nn.Parameter(torch.randn(n_tokens, k, d) / math.sqrt(k))
            self.field_b = nn.Parameter(torch.zeros(n_tokens, d))
        request_dense = [i for i, f in enumerate(schema.dense) if not f.candidate]
        candidate_dense = [i for i, f in enumerate(schema.dense) if f.candidate]
        self.register_buffer("request_dense_idx", torch.tensor(request_dense, dtype=torch.long), persistent=False)
        self.register_buffer("candidate_dense_idx", torch.tensor(candidate_dense, dtype=torch.long),
                             persistent=False)
        self.dense_proj = nn.Linear(len(request_dense), d) if request_dense else None  # a prefix token
        self.candidate_dense_proj = nn.Linear(len(candidate_dense), d) if candidate_dense else None  # a target token
        # target tokens: one per target field (batched like the field tokens), or one per group
        self.register_buffer("target_field_idx", torch.tensor(target_idx, dtype=torch.long), persistent=False)
        self.target_proj = None
        if cfg.target_tokens == "feature":
            self.target_w = nn.Parameter(torch.randn(len(target_idx), emb_dim, d) / math.sqrt(emb_dim))
            self.target_b = nn.Parameter(torch.zeros(len(target_idx), d))
        else:
            tgroups = list(dict.fromkeys(groups[i] for i in target_idx))
            self.target_sets = [[i for i in target_idx if groups[i] == g] for g in tgroups]
            for j, idx in enumerate(self.target_sets):
                self.register_buffer(f"target_idx_{j}", torch.tensor(idx, dtype=torch.long), persistent=False)
            self.target_proj = nn.ModuleList(nn.Linear(len(idx) * emb_dim, d) for idx in self.target_sets)
        # behaviour (event) tokens: per sequence, the side features' embeddings concatenated (or
        # summed) through one projection; several sequences side by side, each its own projection
        self.user_centric = cfg.mode == "user_centric"
        self.event_features = [[f.name for f in q.features
                                if not (self.user_centric and k == 0 and f.name == cfg.action_feature)]
                               for k, q in enumerate(schema.sequences)]
        width = [len(names) * emb_dim if cfg.event_tokens == "concat" else emb_dim for names in self.event_features]
        self.behaviour_proj = nn.Linear(width[0], d)
        self.other_behaviour_proj = nn.ModuleList(nn.Linear(w, d) for w in width[1:])
        if self.user_centric:
            names = [f.name for f in schema.sequences[0].features]
            if cfg.action_feature not in names or len(names) < 2:
                raise ValueError(f"tokenformer.action_feature '{cfg.action_feature}' must be one of the "
                                 f"sequence's side features {names}, beside at least one item feature")
            self.action_proj = nn.Linear(emb_dim, d)
            self.action_head = nn.Linear(d, 1)
        self.sep = nn.Parameter(torch.randn(2, d) * 0.02)
        kernel = cfg.attention_kernel
        if kernel == "auto":
            kernel = default_kernel(device or torch.device("cpu"))
        windows = [None] * cfg.num_full_layers + list(cfg.windows)
        self.layers = nn.ModuleList(BLOCKS[block](cfg, w, kernel) for w in windows)
        self.final_norm = RMSNorm(d)
        self.head = nn.Linear(d, num_tasks)
        self.prefix_passes = 0  # requests whose prefix score_candidates computed (a counter, not state)

    @property
    def num_prefix_tokens(self) -> int:
        """Field tokens (+ the dense token) and the first separator: what BFTS drops."""
        return self.num_field_tokens + (1 if self.dense_proj is not None else 0) + 1

    @property
    def num_target_tokens(self) -> int:
        per_field = self.target_proj is None
        return (len(self.target_field_idx) if per_field else len(self.target_proj)) + (
            self.candidate_dense_proj is not None)

    def _events(self, sparse: SparseOutput, k: int) -> torch.Tensor:
        """Sequence k's event inputs [B, L, n·De] (concat) or [B, L, De] (sum), left-aligned."""
        x_BLDe = sparse.sequences[k][0]
        names = self.event_features[k]
        feats = sparse.sequence_features[k] if sparse.sequence_features else None
        if self.cfg.event_tokens == "concat":
            if feats is None:
                raise ValueError("tokenformer.event_tokens = 'concat' reads each side feature's embedding "
                                 "(SparseOutput.sequence_features); this input has only their sum")
            return torch.cat([feats[n] for n in names], dim=-1)
        if self.user_centric and k == 0:
            return x_BLDe - feats[self.cfg.action_feature]
        return x_BLDe

    def prefix_tokens(self, dense_BDd: torch.Tensor, sparse: SparseOutput):
        """The request-level part of the stream, ``[fields | dense | <sep> | behaviours | <sep>]``:
        (x_BPD, pos_BP, key_valid_BP, newest_B1, num_behaviour_slots). Identical for every
        candidate of a request, which is what shared-prefix scoring computes once."""
        fields = sparse.fields_BFD
        B = fields.shape[0]
        parts = []
        if self.num_field_tokens:
            f = fields.index_select(1, self.field_idx)
            pad = self.num_field_tokens * self.fields_per_token - f.shape[1]
            f = F.pad(f, (0, 0, 0, pad)).reshape(B, self.num_field_tokens, -1)
            parts.append(torch.einsum("bnk,nkd->bnd", f, self.field_w) + self.field_b)
        if self.dense_proj is not None:
            parts.append(self.dense_proj(dense_BDd.index_select(1, self.request_dense_idx))[:, None])
        n_prefix = sum(p.shape[1] for p in parts)
        parts.append(self.sep[0].expand(B, 1, -1))
        x_BLDe, lengths_B = sparse.sequences[0]
        L = x_BLDe.shape[1]
        if self.user_centric:  # [item_1, action_1, item_2, action_2, …], each pair at time t
            action = sparse.sequence_features[0][self.cfg.action_feature]
            items = self.behaviour_proj(right_align(self._events(sparse, 0), lengths_B))
            actions = self.action_proj(right_align(action, lengths_B))
            parts.append(torch.stack([items, actions], dim=2).reshape(B, 2 * L, -1))
        else:
            parts.append(self.behaviour_proj(right_align(self._events(sparse, 0), lengths_B)))
        for k, (proj, (_, len_s)) in enumerate(zip(self.other_behaviour_proj, sparse.sequences[1:]), start=1):
            parts.append(proj(right_align(self._events(sparse, k), len_s)))
        parts.append(self.sep[1].expand(B, 1, -1))
        x = torch.cat(parts, dim=1)
        dev = x.device
        # time index per sequence: 1..n for its real behaviours (newest = n), <= 0 for padding
        times, newest = [], torch.zeros(B, 1, dtype=torch.long, device=dev)
        for k, (x_s, len_s) in enumerate(sparse.sequences):
            n = len_s.to(dev).long()[:, None]
            t = torch.arange(x_s.shape[1], device=dev)[None, :] - (x_s.shape[1] - n) + 1
            times.append(t.repeat_interleave(2, dim=1) if k == 0 and self.user_centric else t)
            newest = torch.maximum(newest, n)
        time_idx = torch.cat(times, dim=1)
        pos = torch.cat([torch.zeros(B, n_prefix + 1, dtype=torch.long, device=dev), time_idx.clamp(min=0),
                         newest + 1], dim=1)
        valid = torch.cat([torch.ones(B, n_prefix + 1, dtype=torch.bool, device=dev), time_idx > 0,
                           torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
        return x, pos, valid, newest, x.shape[1] - n_prefix - 2

    def target_tokens(self, fields_BFD: torch.Tensor, dense_BDd: torch.Tensor) -> torch.Tensor:
        """The candidate-level tokens [B, T, D]: one per target field (``target_tokens =
        "feature"``) or per target group, then one for the candidate-level dense features (when
        the schema has any)."""
        B = fields_BFD.shape[0]
        if self.target_proj is None:  # one token per target field
            parts = [torch.einsum("bnk,nkd->bnd", fields_BFD.index_select(1, self.target_field_idx),
                                  self.target_w) + self.target_b]
        else:
            parts = [proj(fields_BFD.index_select(1, getattr(self, f"target_idx_{j}")).reshape(B, -1))[:, None]
                     for j, proj in enumerate(self.target_proj)]
        if self.candidate_dense_proj is not None:
            parts.append(self.candidate_dense_proj(dense_BDd.index_select(1, self.candidate_dense_idx))[:, None])
        return torch.cat(parts, dim=1)

    def tokens(self, dense_BDd: torch.Tensor, sparse: SparseOutput):
        """The whole stream: (x_BSD, pos_BS, key_valid_BS, num_behaviour_slots); the target
        tokens sit at the position after the newest behaviour."""
        x, pos, valid, newest, L = self.prefix_tokens(dense_BDd, sparse)
        targets = self.target_tokens(sparse.fields_BFD, dense_BDd)
        T = targets.shape[1]
        return (torch.cat([x, targets], dim=1), torch.cat([pos, (newest + 1).expand(-1, T)], dim=1),
                F.pad(valid, (0, T), value=True), L)

    def plan(self, stream_len: int, trimmed: bool) -> list[tuple[int, int]]:
        """Per layer (keys, queries) for a stream of ``stream_len`` tokens; ``trimmed``: only the
        last token is read (new-impression), else every row (user-centric, diagnostics)."""
        drop = self.cfg.drop_field_tokens and 0 < self.cfg.num_full_layers < len(self.layers)
        return receptive_field_plan(stream_len, [layer.window for layer in self.layers],
                                    self.cfg.num_full_layers if drop else None, self.num_prefix_tokens,
                                    1 if trimmed else None)

    def score_candidates(self, dense_RDd: torch.Tensor, sparse_R: SparseOutput, fields_NFD: torch.Tensor,
                         dense_NDd: torch.Tensor, counts_R: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Logits [N, num_tasks] of N candidates in R requests (``counts_R``), each request's prefix
        computed once (``model.candidates``); equal to ``forward`` on each candidate's full row.
        The HSTU block has no cached path: its rows are scored one by one."""
        if isinstance(self.layers[0], HSTUBlock):
            return self(*candidates.expand_requests(dense_RDd, sparse_R, fields_NFD, dense_NDd, counts_R,
                                                    self.target_field_idx, self.candidate_dense_idx))
        return candidates.score_candidates(self, dense_RDd, sparse_R, fields_NFD, dense_NDd, counts_R, chunk_size)

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput, return_states: bool = False):
        logits, aux = self.forward_with_aux(dense_BDd, sparse, return_states)
        return (logits, aux["states"]) if return_states else logits

    def forward_with_aux(self, dense_BDd: torch.Tensor, sparse: SparseOutput, return_states: bool = False,
                         trim: bool | None = None):
        """Logits [B, num_tasks] plus ``aux``: per-layer behaviour states (``return_states``) and,
        in the user-centric mode, ``action_logits_BL`` (left-aligned like the input sequence).

        ``trim`` (default: ``cfg.trim`` in new-impression mode without states or diagnostics):
        run the receptive-field plan (``plan``), exact for the logits; else every row."""
        x, pos, valid, L = self.tokens(dense_BDd, sparse)
        diagnosing = return_states or any(getattr(layer, "captured", None) is not None for layer in self.layers)
        if trim is None:
            trim = self.cfg.trim and not diagnosing and not self.user_centric
        if trim and (self.user_centric or diagnosing):
            raise ValueError("tokenformer: trimming reads only the last token; the user-centric mode and "
                             "diagnostics read every position")
        tail = L + 1 + self.num_target_tokens  # behaviour slots, then <sep> and target tokens, at the end
        states = []
        for layer, (keys, queries) in zip(self.layers, self.plan(x.shape[1], trim)):
            x, pos, valid = x[:, -keys:], pos[:, -keys:], valid[:, -keys:]  # also drops the field tokens
            x = layer(x, pos, valid, queries)
            if return_states:
                states.append((x[:, -tail:x.shape[1] - tail + L], valid[:, -tail:valid.shape[1] - tail + L]))
        aux = {"states": states}
        if self.user_centric:  # item tokens (even slots) predict the action that follows them
            items_BLD = self.final_norm(x[:, -tail:x.shape[1] - tail + L:2])
            aux["action_logits_BL"] = right_align(self.action_head(items_BLD), sparse.sequences[0][1],
                                                  inverse=True).squeeze(-1)
        return self.head(self.final_norm(x[:, -1])), aux

