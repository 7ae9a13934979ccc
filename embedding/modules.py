"""Schema → unsharded TorchRec modules: ``EmbeddingBagCollection`` for fields (pooled) and
``EmbeddingCollection`` for sequences (one embedding per position), each with its ``IdHasher``.

Modules are built on the ``meta`` device for sharding (``embedding.sharding`` materializes only
the local shards) or on a real device for single-process use (tests, export, serving).
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from embedding.hashing import IdHasher
from embedding.schema import FeatureSchema

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def field_bag_configs(schema: FeatureSchema) -> list[EmbeddingBagConfig]:
    pooling = {f.table: f.pooling for f in schema.sparse}
    return [
        EmbeddingBagConfig(
            name=t.name, num_embeddings=t.hash_size, embedding_dim=t.dim,
            feature_names=[f.name for f in schema.sparse if f.table == t.name],
            pooling=_POOLING[pooling[t.name]],
        )
        for t in schema.field_tables
    ]


def sequence_configs(schema: FeatureSchema) -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(
            name=t.name, num_embeddings=t.hash_size, embedding_dim=t.dim,
            feature_names=[q.column(f) for q in schema.sequences for f in q.features
                           if f.table == t.name],
        )
        for t in schema.sequence_tables
    ]


def field_hasher(schema: FeatureSchema) -> IdHasher:
    return IdHasher(schema.field_names, [schema.table(f.table).hash_size for f in schema.sparse])


def sequence_hasher(schema: FeatureSchema) -> IdHasher:
    feats = [(q.column(f), f.table) for q in schema.sequences for f in q.features]
    return IdHasher([c for c, _ in feats], [schema.table(t).hash_size for _, t in feats])


def build_field_ebc(schema: FeatureSchema, device: torch.device) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=field_bag_configs(schema), device=device)


def build_sequence_ec(schema: FeatureSchema, device: torch.device) -> EmbeddingCollection:
    return EmbeddingCollection(tables=sequence_configs(schema), device=device)
