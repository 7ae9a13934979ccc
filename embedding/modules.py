"""Schema → unsharded TorchRec modules: ``EmbeddingBagCollection`` for fields (pooled) and
``EmbeddingCollection`` for sequences (one embedding per position), each with its ``IdHasher``.

Field tables marked ``managed_collision`` go into a ``ManagedCollisionEmbeddingBagCollection``
instead: their ids are hashed into a large input space (``MC_INPUT_HASH_SIZE``, where 64-bit ids
practically never collide) and TorchRec's ``MCHManagedCollisionModule`` gives each id its own row
(zero-collision hashing), admitting ids while training and evicting by the table's policy when
full; ids it has no row for read the table's last row (the "miss" row).

Id-space tables (``FeatureSchema.id_space_tables``: one table for the target item field and the
history items) are declared once, in the unpooled collection, with every feature name that uses
them — the field's and the sequence columns' — the TorchRec way to share a table between
features: it is sharded once and each feature's lookup reads the same rows. Its fields are pooled
by ``model.sparse.SparseArch``. Managed-collision sequence and id-space tables go into a
``ManagedCollisionEmbeddingCollection``.

Modules are built on the ``meta`` device for sharding (``embedding.sharding`` materializes only
the local shards) or on a real device for single-process use (tests, export, serving).
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)

from embedding.hashing import IdHasher
from embedding.schema import FeatureSchema

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


MC_INPUT_HASH_SIZE = 1 << 40  # ids of managed tables are hashed into [0, 2^40) before the MCH
EVICTION = {"distance_lfu": DistanceLFU_EvictionPolicy, "lfu": LFU_EvictionPolicy,
            "lru": LRU_EvictionPolicy}


def managed_tables(schema: FeatureSchema) -> list[str]:
    """Every managed-collision table: pooled field tables, then sequence and id-space tables."""
    names = dict.fromkeys(t.name for t in schema.field_tables + schema.sequence_tables if t.managed_collision)
    return list(names)


def pooled_tables(schema: FeatureSchema) -> list:
    """Field tables looked up by an EBC: every field table but the id-space ones."""
    shared = set(schema.id_space_tables)
    return [t for t in schema.field_tables if t.name not in shared]


def field_bag_configs(schema: FeatureSchema, managed: bool | None = None) -> list[EmbeddingBagConfig]:
    """``managed``: only the managed-collision tables (True), only the others (False), all (None).
    Id-space tables are not here (``sequence_configs``)."""
    pooling = {f.table: f.pooling for f in schema.sparse}
    return [
        EmbeddingBagConfig(
            name=t.name, num_embeddings=t.hash_size, embedding_dim=t.dim,
            feature_names=[f.name for f in schema.sparse if f.table == t.name],
            pooling=_POOLING[pooling[t.name]],
        )
        for t in pooled_tables(schema)
        if managed is None or t.managed_collision == managed
    ]


def sequence_configs(schema: FeatureSchema, managed: bool | None = None) -> list[EmbeddingConfig]:
    """Unpooled tables: sequence tables, an id-space table with its fields' names first and then
    its sequence columns. ``managed`` filters as in ``field_bag_configs``."""
    return [
        EmbeddingConfig(
            name=t.name, num_embeddings=t.hash_size, embedding_dim=t.dim,
            feature_names=[f.name for f in schema.sparse if f.table == t.name]
            + [q.column(f) for q in schema.sequences for f in q.features if f.table == t.name],
        )
        for t in schema.sequence_tables
        if managed is None or t.managed_collision == managed
    ]


def _input_size(schema: FeatureSchema, table: str) -> int:
    t = schema.table(table)
    return MC_INPUT_HASH_SIZE if t.managed_collision else t.hash_size


def field_hasher(schema: FeatureSchema) -> IdHasher:
    feats = [(f.name, f.table) for f in schema.sparse]
    return IdHasher(schema.field_names, [_input_size(schema, t) for _, t in feats], schema.salt_names(feats))


def sequence_hasher(schema: FeatureSchema) -> IdHasher:
    feats = [(q.column(f), f.table) for q in schema.sequences for f in q.features]
    return IdHasher([c for c, _ in feats], [_input_size(schema, t) for _, t in feats], schema.salt_names(feats))


def build_field_ebc(schema: FeatureSchema, device: torch.device) -> EmbeddingBagCollection | None:
    """The field tables without managed collision (None when every table is managed)."""
    configs = field_bag_configs(schema, managed=False)
    return EmbeddingBagCollection(tables=configs, device=device) if configs else None


@torch.no_grad()
def zero_unsharded_miss_rows(mc_ebc: ManagedCollisionEmbeddingBagCollection) -> int:
    """Zero the miss row (the last row) of each table of an unsharded managed-collision EBC."""
    for cfg in mc_ebc._embedding_module.embedding_bag_configs():
        mc_ebc._embedding_module.embedding_bags[cfg.name].weight[-1] = 0
    return len(mc_ebc._embedding_module.embedding_bag_configs())


def build_field_mc_ebc(schema: FeatureSchema, device: torch.device, buckets: int = 1,
                       batch_rows: int = 0) -> ManagedCollisionEmbeddingBagCollection | None:
    """The managed-collision field tables (None when there are none). ``buckets``: the number of
    row-wise shards the MCH modules are split into (the sharding planner needs it to divide
    evenly: use the world size)."""
    configs = field_bag_configs(schema, managed=True)
    if not configs:
        return None
    return ManagedCollisionEmbeddingBagCollection(
        EmbeddingBagCollection(tables=configs, device=device),
        ManagedCollisionCollection(managed_collision_modules=_mch_modules(schema, configs, device, buckets),
                                   embedding_configs=configs),
        return_remapped_features=True)


MULTI_VALUED_IDS_PER_ROW = 16  # the admission-buffer bound per row of a multi-valued field


class SizedMCHModule(MCHManagedCollisionModule):
    """TorchRec's MCH module sizes the buffer of ids waiting for admission from the *first*
    batch it sees (its id count × ``eviction_interval`` × 1.25) and silently drops ids beyond it
    in later batches. A table whose id count per batch varies — the history ids of an id-space
    table, a multi-valued field — then loses ids for good when the first batch is small (short
    or no histories first, a padding batch). ``ids_per_step`` sets a floor: the most ids one step
    can bring (``table_ids_per_row`` × the batch rows), so no id is dropped."""

    def __init__(self, *args, ids_per_step: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ids_per_step = int(ids_per_step)

    def _init_history_buffers(self, features) -> None:
        from torchrec.sparse.jagged_tensor import JaggedTensor

        seen = sum(f.values().numel() for f in features.values())
        if seen < self._ids_per_step:  # the parent reads only values().numel() of each feature
            n = self._ids_per_step
            features = {"_floor": JaggedTensor(values=torch.empty(n, dtype=torch.int64, device=self.device),
                                               lengths=torch.tensor([n]))}
        super()._init_history_buffers(features)

    def rebuild_with_output_id_range(self, *args, **kwargs) -> SizedMCHModule:
        module = super().rebuild_with_output_id_range(*args, **kwargs)  # type(self)(…): keep the floor
        module._ids_per_step = self._ids_per_step
        return module


def table_ids_per_row(schema: FeatureSchema, table: str) -> int:
    """At most how many ids one row brings to ``table``: 1 per single-valued field,
    ``MULTI_VALUED_IDS_PER_ROW`` per multi-valued one, ``max_len`` per sequence feature."""
    fields = sum(MULTI_VALUED_IDS_PER_ROW if f.multi_valued else 1 for f in schema.sparse if f.table == table)
    return fields + sum(q.max_len for q in schema.sequences for f in q.features if f.table == table)


def _mch_modules(schema: FeatureSchema, configs, device: torch.device, buckets: int,
                 batch_rows: int = 0) -> dict:
    """``batch_rows``: the most rows of one step (training or evaluation batch): sizes each
    table's admission buffer (``SizedMCHModule``); 0 leaves TorchRec's first-batch sizing."""
    mc_device = torch.device("cpu") if device.type == "meta" else device  # small id buffers
    modules = {}
    for c in configs:
        t = schema.table(c.name)
        modules[c.name] = SizedMCHModule(
            zch_size=c.num_embeddings, device=mc_device, eviction_policy=EVICTION[t.eviction_policy](),
            eviction_interval=t.eviction_interval, input_hash_size=MC_INPUT_HASH_SIZE, name=c.name,
            buckets=buckets, ids_per_step=batch_rows * table_ids_per_row(schema, c.name))
    return modules


def build_sequence_ec(schema: FeatureSchema, device: torch.device) -> EmbeddingCollection | None:
    """The unpooled tables without managed collision (None when there are none)."""
    configs = sequence_configs(schema, managed=False)
    return EmbeddingCollection(tables=configs, device=device) if configs else None


def build_sequence_mc_ec(schema: FeatureSchema, device: torch.device, buckets: int = 1,
                         batch_rows: int = 0) -> ManagedCollisionEmbeddingCollection | None:
    """The managed-collision unpooled tables (None when there are none); ``buckets`` as in
    ``build_field_mc_ebc``."""
    configs = sequence_configs(schema, managed=True)
    if not configs:
        return None
    return ManagedCollisionEmbeddingCollection(
        EmbeddingCollection(tables=configs, device=device),
        ManagedCollisionCollection(managed_collision_modules=_mch_modules(schema, configs, device, buckets,
                                                                          batch_rows),
                                   embedding_configs=configs),
        return_remapped_features=True)


@torch.no_grad()
def zero_unsharded_miss_rows_ec(mc_ec: ManagedCollisionEmbeddingCollection) -> int:
    """``zero_unsharded_miss_rows`` for a managed-collision EC."""
    for cfg in mc_ec._embedding_module.embedding_configs():
        mc_ec._embedding_module.embeddings[cfg.name].weight[-1] = 0
    return len(mc_ec._embedding_module.embedding_configs())
