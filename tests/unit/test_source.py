"""The training stream's cutting and dealing, without Ray: ``rebatch`` and ``deal_files``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.source import deal_files, rebatch


@pytest.mark.parametrize("sizes", [[8, 8, 8], [5, 11, 3, 0, 9], [2], [], [16, 1]])
def test_rebatch_cuts_like_iter_batches(sizes: list[int]) -> None:
    """Every row once, in order, in batches of 4 (the last may be short), across block edges."""
    start, blocks = 0, []
    for n in sizes:
        blocks.append(pa.table({"x": pa.array(range(start, start + n), pa.int64())}))
        start += n
    got = list(rebatch(blocks, 4))
    assert [t.num_rows for t in got] == [4] * (start // 4) + ([start % 4] if start % 4 else [])
    assert [v for t in got for v in t.column("x").to_pylist()] == list(range(start))


def test_deal_files_balances_rows_and_keeps_file_order(tmp_path: Path) -> None:
    files = []
    for i, rows in enumerate([100, 10, 60, 40, 50]):
        files.append(tmp_path / f"part-{i}.parquet")
        pq.write_table(pa.table({"x": list(range(rows))}), files[-1])
    parts = deal_files(files, 2)
    rows = [sum(pq.read_metadata(f).num_rows for f in p) for p in parts]
    assert sorted(f for p in parts for f in p) == sorted(files)  # every file once
    # largest first to the lighter worker: 100, 60, 50 → B, 40 → A, 10 → B
    assert rows == [140, 120] and max(rows) - min(rows) <= 100  # within one file's rows
    assert all(p == sorted(p, key=files.index) for p in parts)  # each in the original order
    assert deal_files(files[:1], 3)[1:] == [[], []]  # more workers than files: empty shares


def test_read_tasks_do_not_import_torch() -> None:
    """Ray Data read tasks unpickle ``ParquetReader`` from ``pipeline.source``; in a fresh
    worker process an import of torch there cost the job's first batch about 4 s."""
    import subprocess
    import sys
    code = "import sys, pipeline.source; print(sorted({'torch', 'torchrec'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
