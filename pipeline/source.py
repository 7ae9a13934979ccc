"""Ray Data source: day-partitioned Parquet → validated, quarantined pyarrow blocks.

``read_logs`` reads only the schema's columns (extra columns are ignored), tags each row with its
source file, and runs the columnar ``QuarantineWriter`` step in the same task; ``iter_batches`` on a worker's shard
then feeds ``pipeline.collate``. ``UnequalSplit`` hands each Ray Train worker a disjoint stream
without dropping rows (Ray's default equalizes by dropping); the training loop equalizes step
counts itself with zero-weight steps, so every row in is trained or quarantined.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.train import DataConfig

from embedding.schema import FeatureSchema
from pipeline.validate import SOURCE, DuplicateFinder, QuarantineWriter, expected_kinds

READ_TASKS = 16  # many small files (a day each) are read a few per task: task start-up dominates otherwise


def read_logs(files: list[Path], schema: FeatureSchema, quarantine_dir: str | Path,
              rows_per_block: int = 8192) -> ray.data.Dataset:
    """A dataset of the files' valid rows, schema columns only, in file order.

    The file list is dealt into at most ``READ_TASKS`` blocks of paths; one ``map_batches`` task
    per block streams each file's row groups (``rows_per_block`` rows at most per output block,
    so the split hands the workers even shares) through the ``QuarantineWriter``. This replaces
    ``ray.data.read_parquet``, which on Ray 2.60 spent 14 s listing and planning 172 small day
    files before the first row came out (1.2 s this way; see docs/benchmarks.md)."""
    columns = list(expected_kinds(schema))
    paths = ray.data.from_items([{"path": str(f)} for f in files],
                                override_num_blocks=min(max(len(files), 1), READ_TASKS))
    reader = ParquetReader(columns, rows_per_block, QuarantineWriter(schema, str(quarantine_dir)))
    return paths.map_batches(reader, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


class ParquetReader:
    """``map_batches`` step: a block of file paths → blocks of valid rows (bad rows quarantined).
    Each row is tagged with its source file (``SOURCE``) so quarantined rows say where they came
    from; ``to_canonical`` drops the tag from the rows that go on."""

    def __init__(self, columns: list[str], rows_per_block: int, writer: QuarantineWriter) -> None:
        self.columns, self.rows_per_block, self.writer = columns, rows_per_block, writer

    def __call__(self, paths: pa.Table) -> Iterator[pa.Table]:
        for path in paths.column("path").to_pylist():
            fs, where = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
            duplicates = DuplicateFinder()  # exact repeats of an earlier row of this file
            with pq.ParquetFile(where, filesystem=fs) as f:
                for rb in f.iter_batches(batch_size=self.rows_per_block, columns=self.columns):
                    table = pa.Table.from_batches([rb])
                    table = table.append_column(SOURCE, pa.repeat(pa.scalar(path, pa.string()), table.num_rows))
                    yield self.writer(table, duplicates(table))


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
