"""Ray Data source: day-partitioned Parquet → validated, quarantined pyarrow blocks.

``read_logs`` reads only the schema's columns (extra columns are ignored), tags each row with its
source file, and runs the columnar ``QuarantineWriter`` step in the same task; ``iter_batches`` on a worker's shard
then feeds ``pipeline.collate``. ``UnequalSplit`` hands each Ray Train worker a disjoint stream
without dropping rows (Ray's default equalizes by dropping); the training loop equalizes step
counts itself with zero-weight steps, so every row in is trained or quarantined.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.train import DataConfig

from embedding.schema import FeatureSchema
from pipeline.row_hash import DuplicateFinder
from pipeline.validate import REQUEST_ID, SOURCE, QuarantineWriter, expected_kinds, normalize, request_id_type

READ_TASKS = 16  # many small files (a day each) are read a few per task: task start-up dominates otherwise


def read_logs(files: list[Path], schema: FeatureSchema, quarantine_dir: str | Path,
              rows_per_block: int | None = None, request_groups: tuple[str, ...] | None = None) -> ray.data.Dataset:
    """A dataset of the files' valid rows, schema columns only, in file order.

    ``request_groups`` (the candidate token groups; scoring): files with a ``request_id`` column
    keep it, and the rows of a request that disagree on a request-level column are quarantined
    (``pipeline.requests``; checked within each chunk read, where a request's rows sit together).

    The file list is dealt into at most ``READ_TASKS`` blocks of paths; one ``map_batches`` task
    per block streams each file's row groups, ``rows_per_block`` rows at a time (by default
    about 2 M values: 65,536 rows of the demo's 25 columns), through the ``QuarantineWriter``.
    Ray Data joins a task's output into blocks of up to 128 MiB (about a file of the demo's
    logs), so small chunks only cost it a copy to join them: 8,192-row chunks took 3.5 CPU
    µs a row in the pipeline benchmark, 65,536-row ones 2.9. Smaller blocks (a lower
    ``target_max_block_size`` or a streaming repartition) brought the first rows sooner but
    halved the 2-consumer rate on 2 cores (docs/benchmarks.md). This replaces
    ``ray.data.read_parquet``, which on Ray 2.60 spent 14 s listing and planning 172 small day
    files before the first row came out (1.2 s this way; see docs/benchmarks.md)."""
    columns = list(expected_kinds(schema))
    rows_per_block = rows_per_block or chunk_rows(len(columns))
    items = [{"path": str(f)} for f in files] or [{"path": ""}]  # "": no file (an empty shard)
    paths = ray.data.from_items(items, override_num_blocks=min(len(items), READ_TASKS))
    request_type = request_id_type(files) if request_groups is not None else None
    writer = QuarantineWriter(schema, str(quarantine_dir), request_groups, request_type)
    reader = ParquetReader(columns, rows_per_block, writer, optional=(REQUEST_ID,) if request_type else ())
    ds = paths.map_batches(reader, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    # No Ray Data progress bars: these streams run inside the training workers, whose step
    # lines are the job's progress; the bars only interleave with them and cost the worker CPU.
    ds.context.enable_progress_bars = False
    return ds


def chunk_rows(n_columns: int) -> int:
    """Rows read at a time: about 2 M values, 65,536 demo rows, 1,024 at 2,000+ columns."""
    return min(65536, max(1024, (1 << 21) // n_columns))


class ParquetReader:
    """``map_batches`` step: a block of file paths → blocks of valid rows (bad rows quarantined).
    Each row is tagged with its source file (``SOURCE``) so quarantined rows say where they came
    from; ``to_canonical`` drops the tag from the rows that go on."""

    def __init__(self, columns: list[str], rows_per_block: int, writer: QuarantineWriter,
                 optional: tuple[str, ...] = ()) -> None:
        self.columns, self.rows_per_block, self.writer, self.optional = columns, rows_per_block, writer, optional

    def __call__(self, paths: pa.Table) -> Iterator[pa.Table]:
        for path in paths.column("path").to_pylist():
            if not path:
                continue
            fs, where = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
            duplicates = DuplicateFinder()  # exact repeats of an earlier row of this file
            with pq.ParquetFile(where, filesystem=fs) as f:
                columns = self.columns + [c for c in self.optional if c in f.schema_arrow.names]
                chunks = (pa.Table.from_batches([rb]) for rb in
                          f.iter_batches(batch_size=self.rows_per_block, columns=columns))
                if REQUEST_ID in columns:
                    chunks = whole_requests(chunks)
                for chunk in chunks:
                    yield self.checked(chunk, path, duplicates)

    def checked(self, table: pa.Table, path: str, duplicates: DuplicateFinder) -> pa.Table:
        """One chunk of ``path`` tagged with it, its bad rows quarantined, the rest canonical."""
        table = normalize(table, self.writer.schema)[0]  # duplicates compare logical values
        table = table.append_column(SOURCE, pa.repeat(pa.scalar(path, pa.string()), table.num_rows))
        return self.writer(table, duplicates(table))


def whole_requests(chunks: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """Chunks of one file re-cut so that a request's consecutive rows (one ``request_id``) never
    straddle two chunks: each chunk's trailing run of one id is carried into the next. The rows of
    a request are then checked together (``pipeline.requests``) and scored from one block."""
    carry = None
    for chunk in chunks:
        if carry is not None:
            chunk = pa.concat_tables([carry, chunk])
        ids = chunk.column(REQUEST_ID)
        if chunk.num_rows == 0 or ids.null_count == chunk.num_rows:
            carry = None
            yield chunk
            continue
        last = ids[chunk.num_rows - 1]
        same = pc.equal(ids, last).fill_null(False).to_numpy(zero_copy_only=False)
        cut = int(np.flatnonzero(~same)[-1]) + 1 if (~same).any() else 0
        carry = chunk.slice(cut) if last.is_valid else None
        if carry is None:
            cut = chunk.num_rows
        if cut:
            yield chunk.slice(0, cut)
    if carry is not None and carry.num_rows:
        yield carry


def batch_runs(blocks: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """The rows of a stream of blocks, in order, as tables of whole ``size``-row batches: each
    block's full batches as one zero-copy slice, and a batch that spans two blocks (a block's
    leftover rows joined with the next block's first rows) as a table of its own. Only the last
    table may be short. Cutting every table into ``size`` rows gives the batches
    ``iter_batches(batch_size=size)`` yields (``rebatch``)."""
    carry = None
    for block in blocks:
        lo = 0
        if carry is not None:  # finish the batch the last block started
            lo = min(size - carry.num_rows, block.num_rows)
            carry = pa.concat_tables([carry, block.slice(0, lo)])
            if carry.num_rows < size:
                continue
            yield carry
            carry = None
        full = lo + (block.num_rows - lo) // size * size
        if full > lo:
            yield block.slice(lo, full - lo)
        if full < block.num_rows:
            carry = block.slice(full)
    if carry is not None:
        yield carry


def rebatch(blocks: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Consecutive ``size``-row tables cut from a stream of blocks, the last one shorter if the
    rows run out: the batches ``iter_batches(batch_size=size)`` yields, in the same order, as
    zero-copy slices of ``batch_runs``. Ray Data's own batcher cost about half
    of the pipeline's steady rate at 512-row batches (docs/benchmarks.md); workers go one step
    further and decode each run once (``collate_blocks``)."""
    for run in batch_runs(blocks, size):
        for lo in range(0, run.num_rows, size):
            yield run.slice(lo, size)


def deal_files(files: list[Path], parts: int) -> list[list[Path]]:
    """Files dealt into ``parts`` lists of nearly equal row counts (footers only; largest
    file first to the part with the fewest rows), each list in the original file order."""
    rows = [pq.read_metadata(f).num_rows for f in files]
    load, owned = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(files)), key=lambda i: (-rows[i], i)):
        p = min(range(parts), key=lambda k: (load[k], k))
        load[p] += rows[i]
        owned[p].append(i)
    return [[files[i] for i in sorted(idx)] for idx in owned]


class UnequalSplit(DataConfig):
    """Like Ray Train's DataConfig, but no row is dropped (Ray's default equalizes by dropping).

    With ``sources`` (dataset name → ``(files, schema, quarantine_dir)``), each worker gets its
    own ``read_logs`` stream over files dealt by row count (``deal_files``). The stream runs in
    the worker's process, with no coordinator actor between it and the read tasks: Ray Data's
    ``streaming_split`` starts one in a fresh process, which took 2–3 s of the job's start on 2
    cores (docs/benchmarks.md). Shares differ by at most about one file's rows; the training
    loop evens out step counts with zero-weight steps.

    Without ``sources``: ``streaming_split(equal=False)``, which hands blocks to whichever worker
    asks first.

    ``deterministic=True``: blocks keep their order. A worker's own stream reads its files in
    order; without ``sources``, blocks are dealt to the workers by position
    (``Dataset.split(equal=False)``, which materializes the dataset once). Either way every run,
    and every epoch, feeds each worker the same rows in the same order — what exact resume needs."""

    def __init__(self, deterministic: bool = False, sources: dict | None = None) -> None:
        super().__init__()
        self.deterministic = deterministic
        self.sources = sources or {}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            options = self._resolve_execution_options(name)
            if self.deterministic:
                options.preserve_order = True
            if name in self.sources:
                files, schema, quarantine, *request_groups = self.sources[name]
                for i, mine in enumerate(deal_files(files, world_size)):
                    own = read_logs(mine, schema, quarantine, request_groups=(request_groups or [None])[0])
                    own.context.execution_options = options
                    output[i][name] = own.iterator()
                continue
            ds = ds.copy(ds)
            ds.context.execution_options = options
            if self.deterministic:
                splits = [s.iterator() for s in ds.split(world_size, equal=False)]
            else:
                splits = ds.streaming_split(world_size, equal=False)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output
