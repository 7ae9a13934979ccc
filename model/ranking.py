"""The servable ranking model (Batch → logits, no loss) and its training wrapper."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from embedding.schema import FeatureSchema
from model.baselines import DCNv2Config, DCNv2Tower, DINConfig, DINTower
from model.dlrm import DLRMConfig, DLRMTower
from model.hyformer import HyFormerConfig, HyFormerTower
from model.onetrans import OneTransConfig, OneTransTower
from model.rankmixer import RankMixerConfig, RankMixerLongerTower
from model.sparse import SparseArch, common_dim
from model.tokenformer import TokenFormer, TokenFormerConfig, naive_transformer

TOWERS = ("dlrm", "dcnv2", "din", "rankmixer_longer", "onetrans", "tokenformer", "naive_transformer", "hstu",
          "hyformer")
TOKENFORMER_TOWERS = ("tokenformer", "naive_transformer", "hstu")  # built from [model.tokenformer]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    tower: str = "dlrm"  # the dense tower: one of TOWERS (README, docs/architecture.md)
    use_sequences: bool = True  # False: the ablation without behaviour sequences
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    din: DINConfig = field(default_factory=DINConfig)
    rankmixer: RankMixerConfig = field(default_factory=RankMixerConfig)
    onetrans: OneTransConfig = field(default_factory=OneTransConfig)
    tokenformer: TokenFormerConfig = field(default_factory=TokenFormerConfig)  # also naive_transformer, hstu
    hyformer: HyFormerConfig = field(default_factory=HyFormerConfig)

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise ValueError(f"model.tower: unknown tower '{self.tower}'; choose one of {TOWERS}")


class RankingModel(nn.Module):
    """``forward(batch) → logits [B, T]``. Embedding tables may be built on ``meta`` for sharding."""

    def __init__(self, schema: FeatureSchema, cfg: ModelConfig,
                 sparse_device: torch.device | None = None, num_shards: int = 1, batch_rows: int = 0) -> None:
        """``batch_rows``: the most rows of one step (``SparseArch``: managed-collision buffers)."""
        super().__init__()
        self.schema = schema if cfg.use_sequences else schema.without_sequences()
        self.cfg = cfg
        self.sparse_arch = SparseArch(self.schema, sparse_device, num_shards, batch_rows)
        self.tower = build_tower(self.schema, cfg)

    def forward(self, batch) -> torch.Tensor:
        return self.forward_with_aux(batch)[0]

    def forward_with_aux(self, batch) -> tuple[torch.Tensor, dict]:
        """Logits and the tower's auxiliary outputs (e.g. user-centric action logits)."""
        sparse = self.sparse_arch(batch.fields, batch.sequences if self.schema.sequences else None)
        if not self.training and getattr(batch, "request_ids", None) is not None \
                and hasattr(self.tower, "score_candidates"):
            return self._score_grouped(batch, sparse), {}
        if hasattr(self.tower, "forward_with_aux"):
            return self.tower.forward_with_aux(batch.dense, sparse)
        return self.tower(batch.dense, sparse), {}


    def _score_grouped(self, batch, sparse) -> torch.Tensor:
        """Evaluation of a batch whose rows carry request ids: rows of one request are scored
        against their first row's prefix, computed once (``score_candidates``); a row with id −1
        is a request of its own. Logits in the batch's row order, equal to row-by-row ones (the
        reader quarantined requests whose rows disagree)."""
        from model.sparse import SparseOutput

        ids = batch.request_ids
        alone = ids == -1
        _, inverse = torch.unique(ids, return_inverse=True)
        group = torch.where(alone, inverse.max() + 1 + torch.cumsum(alone.long(), 0), inverse)
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group)
        counts = counts[counts > 0]
        first = order[torch.cumsum(counts, 0) - counts]
        prefix = SparseOutput(fields_BFD=sparse.fields_BFD[first],
                              sequences=[(x[first], n[first]) for x, n in sparse.sequences],
                              sequence_features=[{k: v[first] for k, v in f.items()} for f in sparse.sequence_features])
        logits_sorted = self.tower.score_candidates(batch.dense[first], prefix, sparse.fields_BFD[order],
                                                    batch.dense[order], counts)
        return torch.empty_like(logits_sorted).index_copy_(0, order, logits_sorted)

    def score_candidates(self, prefix, candidates, counts_R: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Logits [N, T] of N candidate rows grouped into R requests: ``prefix`` is a ``Batch`` of
        R rows (one per request: its request-level columns — user and context fields,
        request-level dense features, sequences), ``candidates`` a ``Batch`` of N rows (their
        candidate-level columns — the fields of ``tokenformer.target_groups`` and candidate-level
        dense features — are read; the sequences may be empty), ``counts_R`` [R] candidates per
        request, in order. TokenFormer computes each request's prefix once; other towers score
        the N full rows one by one. Equal to ``forward`` on the full rows."""
        from model.candidates import expand_requests

        sparse_R = self.sparse_arch(prefix.fields, prefix.sequences if self.schema.sequences else None)
        fields_N = self.sparse_arch.pooled_fields(candidates.fields)
        if hasattr(self.tower, "score_candidates"):
            return self.tower.score_candidates(prefix.dense, sparse_R, fields_N, candidates.dense, counts_R,
                                               chunk_size)
        groups = self.cfg.tokenformer.target_groups
        field_idx = torch.tensor([i for i, f in enumerate(self.schema.sparse) if f.group in groups], dtype=torch.long)
        dense_idx = torch.tensor([i for i, f in enumerate(self.schema.dense) if f.candidate], dtype=torch.long)
        dense_N, sparse_N = expand_requests(prefix.dense, sparse_R, fields_N, candidates.dense, counts_R,
                                            field_idx, dense_idx)
        return self.tower(dense_N, sparse_N)


def build_tower(schema: FeatureSchema, cfg: ModelConfig) -> nn.Module:
    dim = common_dim(schema, f"the {cfg.tower} tower")
    num_tasks = len(schema.labels)
    if cfg.tower == "dlrm":
        return DLRMTower(num_dense=len(schema.dense), num_fields=len(schema.sparse),
                         num_sequences=len(schema.sequences), dim=dim, num_tasks=num_tasks, cfg=cfg.dlrm)
    if cfg.tower == "dcnv2":
        return DCNv2Tower(schema, cfg.dcnv2, emb_dim=dim, num_tasks=num_tasks)
    if cfg.tower == "din":
        return DINTower(schema, cfg.din, emb_dim=dim, num_tasks=num_tasks)
    if cfg.tower == "onetrans":
        return OneTransTower(schema, cfg.onetrans, emb_dim=dim, num_tasks=num_tasks)
    if cfg.tower == "rankmixer_longer":
        return RankMixerLongerTower(schema, cfg.rankmixer, emb_dim=dim, num_tasks=num_tasks)
    if cfg.tower == "hyformer":
        return HyFormerTower(schema, cfg.hyformer, emb_dim=dim, num_tasks=num_tasks)
    tf_cfg = cfg.tokenformer if cfg.tower == "tokenformer" else naive_transformer(cfg.tokenformer)
    block = "hstu" if cfg.tower == "hstu" else "uib"
    return TokenFormer(schema, tf_cfg, emb_dim=dim, num_tasks=num_tasks, block=block)


def positive_actions(raw_BL: torch.Tensor, positive_min: int) -> torch.Tensor:
    """User-centric action labels [B, L] float: 1 where the raw action id is >= ``positive_min``
    (``[model.tokenformer].action_positive_min``; e.g. MovieLens ratings 1–5 with 4: 0,0,0,1,1)."""
    return (raw_BL >= positive_min).float()


class RankingTrain(nn.Module):
    """Adds the loss: BCE averaged over tasks, summed over real rows (``batch.weights``) and
    divided by the batch size *including* padding — the same on every worker — so after DDP's
    averaging every real row weighs the same, a short tail batch included. An all-padding batch
    gives loss 0 and zero gradients."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux = self.model.forward_with_aux(batch)
        per_row = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").mean(1)
        loss = (per_row * batch.weights).sum() / batch.weights.shape[0]
        if "action_logits_BL" in aux:
            loss = loss + self.model.cfg.tokenformer.action_loss_weight * self._action_loss(batch, aux)
        return loss, logits.detach()

    def _action_loss(self, batch, aux) -> torch.Tensor:
        """User-centric mode: BCE of each real behaviour's "positive action" (raw action id >=
        ``tokenformer.action_positive_min``: 1 for 0/1 feedback, 4 for 1–5 ratings), padding and
        padding rows masked."""
        q = self.model.schema.sequences[0]
        tf = self.model.cfg.tokenformer
        jt = batch.sequences[f"{q.name}_{tf.action_feature}"]
        actions_BL = positive_actions(jt.to_padded_dense(desired_length=q.max_len), tf.action_positive_min)
        valid_BL = torch.arange(q.max_len, device=actions_BL.device)[None] < jt.lengths()[:, None]
        w_BL = valid_BL * batch.weights[:, None]
        bce = F.binary_cross_entropy_with_logits(aux["action_logits_BL"], actions_BL, reduction="none")
        return (bce * w_BL).sum() / w_BL.sum().clamp(min=1.0)
