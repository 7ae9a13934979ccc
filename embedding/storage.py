"""Where the jobs read and write: a local path or an object-store URI (``s3://bucket/key``,
``gs://…``, ``hdfs://…``), through pyarrow filesystems — no hand-written clients.

Credentials and endpoints come from each library's standard environment variables and config
files, never from tokenrec's config: for S3-compatible stores ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (read by pyarrow, fsspec/s3fs and boto3 alike;
MLflow's artifact client reads ``MLFLOW_S3_ENDPOINT_URL`` instead — ``docs/cluster.md``).

Object stores have no atomic rename and no folders: a "folder" is a key prefix, a write of one
object is atomic (readers see the old object or the new one), and a set of objects becomes
visible as a whole only through a commit marker written last (``jobs.checkpoint``). Transient
errors (throttling, timeouts, 5xx) are retried with exponential backoff (``retry``); a missing
object or a refused credential is not transient and raises at once.
"""

from __future__ import annotations

import os
import posixpath
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")
TRANSIENT = ("slowdown", "throttl", "timeout", "timed out", "connection reset", "connection refused",
             "service unavailable", "internal error", "503", "500", "502", "504", "temporarily")


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names an object store (a scheme other than ``file``)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def location(value: str | Path) -> Path | str:
    """A command-line location: a ``Path`` for a local one, the URI string itself for an object
    store (``Path("s3://b/k")`` would fold the ``//``)."""
    return str(value) if is_uri(value) else Path(value)


def absolute(path: str | Path) -> str:
    """The location as recorded in tags and logs: a resolved local path, or the URI."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``path`` and the path inside it (``bucket/key`` for S3, an
    absolute path for local files). Raises ``ValueError`` for a scheme pyarrow cannot open."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(str(path).removeprefix("file://")).resolve())
    try:
        return pafs.FileSystem.from_uri(str(path))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: cannot open this location ({e}); local paths and s3://, gs://, hdfs:// "
                         "URIs are supported") from None


def join(base: str | Path, *parts: str) -> str:
    """``base/part/…`` for a URI (posix separators) or a local path."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def transient(e: BaseException) -> bool:
    """Whether an error may go away when retried (throttling, timeouts, 5xx), as opposed to a
    missing object, a refused credential or a bad request."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(e).lower()
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) and any(t in text for t in TRANSIENT)


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """``fn()``, retried on transient errors with exponential backoff and jitter (0.2, 0.4, 0.8,
    1.6 s); the last error is raised with ``what`` named. Non-transient errors raise at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not transient(e) or attempt == attempts - 1:
                if attempt:
                    raise OSError(f"{what}: failed after {attempt + 1} attempts: {e}") from e
                raise
            time.sleep(base_delay * 2 ** attempt * (1 + random.random() / 2))
    raise AssertionError("unreachable")


def exists(path: str | Path) -> bool:
    fs, p = filesystem(path)
    return retry(lambda: fs.get_file_info(p).type != pafs.FileType.NotFound, f"checking {path}")


def size(path: str | Path) -> int:
    """A file's size in bytes. Raises ``FileNotFoundError`` when it is not there."""
    fs, p = filesystem(path)
    info = retry(lambda: fs.get_file_info(p), f"checking {path}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return info.size


def isdir(path: str | Path) -> bool:
    """A local folder, or an object-store prefix that holds at least one object."""
    fs, p = filesystem(path)
    if not is_uri(path):
        return Path(p).is_dir()
    return retry(lambda: bool(fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))),
                 f"listing {path}")


def files_under(path: str | Path) -> list[str]:
    """Every file under ``path`` (recursively), as paths relative to it with ``/`` separators,
    sorted part by part. [] when nothing is there."""
    fs, p = filesystem(path)
    infos = retry(lambda: fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True)),
                  f"listing {path}")
    root = p.rstrip("/") + "/"
    found = [i.path[len(root):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(root)]
    return sorted(found, key=lambda rel: rel.split("/"))  # folder by folder, as sorted(Path.rglob(…))


def names(path: str | Path) -> list[str]:
    """The entries directly under ``path`` (files and sub-folders / prefixes), sorted."""
    fs, p = filesystem(path)
    infos = retry(lambda: fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False)),
                  f"listing {path}")
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def read_bytes(path: str | Path) -> bytes:
    fs, p = filesystem(path)

    def read() -> bytes:
        with fs.open_input_stream(p) as f:
            return f.read()
    return retry(read, f"reading {path}")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write one file at once: readers see the old content or the new one, never a part (local:
    a temporary file renamed over it; object stores: one PUT)."""
    fs, p = filesystem(path)
    if not is_uri(path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{p}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, p)
        return

    def write() -> None:
        with fs.open_output_stream(p) as f:
            f.write(data)
    retry(write, f"writing {path}")


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def delete(path: str | Path) -> None:
    """Remove a file or a whole folder / prefix; nothing there is not an error."""
    fs, p = filesystem(path)
    info = retry(lambda: fs.get_file_info(p), f"checking {path}")
    if info.type == pafs.FileType.File:
        retry(lambda: fs.delete_file(p), f"deleting {path}")
    elif info.type == pafs.FileType.Directory or is_uri(path):
        retry(lambda: fs.delete_dir_contents(p, missing_dir_ok=True), f"deleting {path}")
        if info.type == pafs.FileType.Directory:
            retry(lambda: fs.delete_dir(p), f"deleting {path}")


def upload(local_dir: str | Path, dest: str | Path) -> None:
    """Copy a local folder's files to ``dest`` (a URI or a local path), keeping relative paths."""
    src_fs, src = pafs.LocalFileSystem(), str(Path(local_dir).resolve())
    dst_fs, dst = filesystem(dest)
    retry(lambda: pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs),
          f"uploading {local_dir} to {dest}")


def download(src: str | Path, local_dir: str | Path) -> None:
    """Copy every file under ``src`` into a local folder, keeping relative paths."""
    src_fs, s = filesystem(src)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    retry(lambda: pafs.copy_files(s, str(Path(local_dir).resolve()), source_filesystem=src_fs,
                                  destination_filesystem=pafs.LocalFileSystem()), f"downloading {src}")
