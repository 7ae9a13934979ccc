"""Day partitions: ``<root>/day=YYYY-MM-DD/part-*.parquet`` and day ranges ``A..B``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from embedding import storage


def parse_day(s: str) -> dt.date:
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        raise ValueError(f"bad day '{s}': expected YYYY-MM-DD") from None


def parse_days(spec: str) -> list[dt.date]:
    """``"2026-01-01..2026-01-03"`` → three dates (inclusive); ``"2026-01-01"`` → one."""
    if ".." in spec:
        a, b = spec.split("..", 1)
        start, end = parse_day(a), parse_day(b)
        if end < start:
            raise ValueError(f"bad day range '{spec}': end before start")
        return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    return [parse_day(spec)]


def parse_range(spec: str, last_train_day: dt.date | None = None) -> list[dt.date]:
    """An evaluation day range: absolute (``"2026-01-05"``, ``"2026-01-05..2026-01-06"``) or
    relative to the last training day (``"+1"``: the next day; ``"+2..+3"``: the two after it).
    Raises ``ValueError`` on a malformed spec or a relative one without ``last_train_day``."""
    spec = spec.strip()
    if spec.startswith("+"):
        parts = spec.split("..", 1)
        try:
            offsets = [int(p.strip().removeprefix("+")) for p in parts]
        except ValueError:
            raise ValueError(f"bad relative day range '{spec}': expected '+N' or '+N..+M'") from None
        if not all(p.strip().startswith("+") for p in parts) or offsets[0] < 1 or offsets[-1] < offsets[0]:
            raise ValueError(f"bad relative day range '{spec}': offsets must be >= +1 and the end not before "
                             "the start")
        if last_train_day is None:
            return []
        return [next_day(last_train_day, k) for k in range(offsets[0], offsets[-1] + 1)]
    return parse_days(spec)


def next_day(day: dt.date, offset: int = 1) -> dt.date:
    return day + dt.timedelta(days=offset)


def day_dir(root: str | Path, day: dt.date) -> Path | str:
    """``<root>/day=YYYY-MM-DD``: a ``Path`` under a local root, a URI string under an
    object-store root (``s3://bucket/logs``)."""
    if storage.is_uri(root):
        return storage.join(root, f"day={day.isoformat()}")
    return Path(root) / f"day={day.isoformat()}"


MARKER_PREFIXES = (".", "_")  # hidden and marker files and folders: _SUCCESS, .crc, _temporary …


def _marker(rel: str) -> bool:
    """Whether a path under a day folder (``/``-separated, relative) is a writer's marker or
    hidden file (any part of it starts with ``.`` or ``_``: ``_SUCCESS``, ``.part-0.parquet.crc``,
    ``_temporary/…``) — ignored, as Spark, Hadoop and pyarrow datasets ignore them."""
    return any(part.startswith(MARKER_PREFIXES) for part in rel.split("/"))


def day_files(root: str | Path, days: list[dt.date], log=None) -> list[Path] | list[str]:
    """Every Parquet file of the given days, in day order, then path order: files in
    sub-folders of a day (``day=…/hour=23/part-0.parquet``) included. Marker and hidden files
    (``_marker``) are ignored; any other file that is not ``*.parquet`` is not read and, given
    ``log``, reported (nothing under a day folder is skipped silently). A missing day, or a day
    without a Parquet file, raises ``FileNotFoundError``.

    ``root`` may be a local folder (``Path`` results) or an object-store URI such as
    ``s3://bucket/logs`` (URI strings; listed through ``embedding.storage``, where a "folder" is
    a key prefix)."""
    files = []
    for day in days:
        d = day_dir(root, day)
        if not storage.isdir(d):
            raise FileNotFoundError(f"no data for day {day}: folder {d} does not exist")
        found, other = [], []
        for rel in storage.files_under(d):
            if _marker(rel):
                continue
            (found if rel.endswith(".parquet") else other).append(rel)
        if other and log is not None:
            log(f"warning: {len(other)} file(s) under {d} are not read (only *.parquet files are; names "
                f"starting with '.' or '_' are markers): {', '.join(other[:3])}" + (" …" if len(other) > 3 else ""))
        if not found:
            raise FileNotFoundError(f"no data for day {day}: {d} holds no *.parquet file")
        files += [storage.child(d, rel) for rel in found]
    return files
