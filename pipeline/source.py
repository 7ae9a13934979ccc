"""Ray Data source: day-partitioned Parquet → validated, quarantined pyarrow blocks.

``read_logs`` reads only the schema's columns (extra columns are ignored), tags each row with its
source file, and runs the columnar ``QuarantineWriter`` step; ``iter_batches`` on a worker's shard
then feeds ``pipeline.collate``. ``UnequalSplit`` hands each Ray Train worker a disjoint stream
without dropping rows (Ray's default equalizes by dropping); the training loop equalizes step
counts itself with zero-weight steps, so every row in is trained or quarantined.
"""

from __future__ import annotations

from pathlib import Path

import ray
import ray.data
from ray.train import DataConfig

from embedding.schema import FeatureSchema
from pipeline.validate import QuarantineWriter, expected_kinds

READ_TASKS = 16  # many small files (a day each) are read a few per task: task start-up dominates otherwise


def read_logs(files: list[Path], schema: FeatureSchema, quarantine_dir: str | Path,
              rows_per_block: int = 8192) -> ray.data.Dataset:
    """``rows_per_block``: blocks are cut to at most this many rows. The split hands out whole
    blocks, so blocks much smaller than a file keep the workers' shares even (Ray otherwise
    merges small files into a few large read blocks)."""
    columns = list(expected_kinds(schema))
    ds = ray.data.read_parquet([str(f) for f in files], columns=columns, include_paths=True,
                               override_num_blocks=min(max(len(files), 1), READ_TASKS))
    writer = QuarantineWriter(schema, str(quarantine_dir))
    return (ds.map_batches(writer, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
            .repartition(target_num_rows_per_block=rows_per_block))  # streaming, no shuffle


class UnequalSplit(DataConfig):
    """Like Ray Train's DataConfig, but ``streaming_split(equal=False)``: no row is dropped.

    ``deterministic=True``: blocks keep their order and are dealt to the workers by position
    (``Dataset.split(equal=False)``, which materializes the dataset once), so every run, and
    every epoch, feeds each worker the same rows in the same order — what exact resume needs.
    Streaming split hands blocks to whichever worker asks first."""

    def __init__(self, deterministic: bool = False) -> None:
        super().__init__()
        self.deterministic = deterministic

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if self.deterministic:
                ds.context.execution_options.preserve_order = True
                splits = [s.iterator() for s in ds.split(world_size, equal=False)]
            else:
                splits = ds.streaming_split(world_size, equal=False)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output
