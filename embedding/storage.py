"""Where the jobs read and write: a local path or an object-store URI (``s3://bucket/key``),
through pyarrow filesystems — no hand-written clients.

Credentials and endpoints come from each library's standard environment variables and config
files, never from tokenrec's config: for S3-compatible stores ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (read by pyarrow, fsspec/s3fs and boto3 alike;
MLflow's artifact client reads ``MLFLOW_S3_ENDPOINT_URL`` instead — ``docs/cluster.md``).

Object stores have no atomic rename and no folders: a "folder" is a key prefix, a write of one
object is atomic (readers see the old object or the new one), and a set of objects becomes
visible as a whole only through a commit marker written last (``jobs.checkpoint``). Transient
errors (throttling, timeouts, 5xx: read from the error's code, ``transient``) are retried with
exponential backoff (``retry``); a missing object or a refused credential raises at once.
Object-store URIs: ``s3://`` is tested here (pyarrow, and s3fs for DCP); other schemes need their
fsspec package (gcsfs, …) installed.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import pyarrow.fs as pafs

T = TypeVar("T")
# S3 error codes (as pyarrow names them: "AWS Error SLOW_DOWN …", and as botocore does) and HTTP
# statuses that mean "try again"; network failures below them. Nothing else is retried: a missing
# key, a refused credential or a bad request raise at once.
TRANSIENT_CODES = {"SLOW_DOWN", "SLOWDOWN", "SERVICE_UNAVAILABLE", "SERVICEUNAVAILABLE", "INTERNAL_FAILURE",
                   "INTERNALERROR", "THROTTLING", "THROTTLINGEXCEPTION", "REQUEST_TIMEOUT", "REQUESTTIMEOUT",
                   "NETWORK_CONNECTION", "REQUEST_TIME_TOO_SKEWED"}
TRANSIENT_HTTP = {500, 502, 503, 504}
NETWORK = ("connection reset", "connection refused", "couldn't connect", "timed out", "broken pipe",
           "curlcode: 28", "curlcode: 7,", "curlcode: 56")


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names an object store (a scheme other than ``file``)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def location(value: str | Path) -> Path | str:
    """A command-line location: a ``Path`` for a local one, the URI string itself for an object
    store (``Path("s3://b/k")`` would fold the ``//``), without a trailing ``/``. Raises
    ``ValueError`` for a URI that carries credentials (``s3://KEY:SECRET@bucket``): they would
    reach tags and logs; they belong in the environment."""
    text = str(value)
    if is_uri(text):
        if "@" in text.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(f"{text.split('://', 1)[0]}://…@…: a location must not carry credentials; set "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store's own variables) instead")
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


def absolute(path: str | Path) -> str:
    """The location as recorded in tags and logs: a resolved local path, or the URI."""
    return str(path).rstrip("/") if is_uri(path) else str(Path(path).resolve())


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


def child(base: str | Path, rel: str) -> str | Path:
    """The location of ``rel`` (a listed, ``/``-separated relative key) under ``base``. For a URI
    each part is percent-encoded, as pyarrow's ``FileSystem.from_uri`` decodes it: a key holding
    ``#``, ``?``, a space or ``%`` names that very key."""
    if is_uri(base):
        return join(base, *(quote(part, safe="=") for part in rel.split("/")))
    return Path(base, rel)


def transient(e: BaseException) -> bool:
    """Whether an error may go away when retried: an S3 error code of ``TRANSIENT_CODES``, an HTTP
    status of ``TRANSIENT_HTTP``, a network failure or a timeout — read from the error's code
    fields, never from words that might be part of a key name. A missing object, a refused
    credential or a bad request is not transient."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(e, OSError):
        return False
    text = str(e)
    code = re.search(r"AWS Error \[?code (\d+)\]?|AWS Error ([A-Z_]+)", text)
    if code and code.group(2) is not None:
        return code.group(2).upper() in TRANSIENT_CODES
    status = re.search(r"\(HTTP (?:status|response code)?:? ?(\d{3})\)|HTTP (\d{3})\b", text)
    if status:
        return int(status.group(1) or status.group(2)) in TRANSIENT_HTTP
    return any(n in text.lower() for n in NETWORK)


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """``fn()``, retried on transient errors with exponential backoff and jitter (0.2, 0.4, 0.8,
    1.6 s). The error that ends it is raised as it is (its type kept), with a note naming ``what``
    and the attempts. Non-transient errors raise at once. ``fn`` must be idempotent."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not transient(e) or attempt == attempts - 1:
                if attempt:
                    e.add_note(f"{what}: failed after {attempt + 1} attempts")
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
    sorted part by part. [] when nothing is there. Locally symlinked folders are not entered
    (``Path.rglob``'s rule: a link cycle cannot repeat files)."""
    if not is_uri(path):
        root_path = Path(str(path))
        if not root_path.is_dir():
            return []
        return [p.relative_to(root_path).as_posix() for p in sorted(root_path.rglob("*")) if p.is_file()]
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

    def gone(op):  # a retry after a delete whose reply was lost finds nothing: done
        def run():
            try:
                op()
            except FileNotFoundError:
                pass
        return run
    if info.type == pafs.FileType.File:
        retry(gone(lambda: fs.delete_file(p)), f"deleting {path}")
    elif info.type == pafs.FileType.Directory or is_uri(path):
        retry(gone(lambda: fs.delete_dir_contents(p, missing_dir_ok=True)), f"deleting {path}")
        if info.type == pafs.FileType.Directory:
            retry(gone(lambda: fs.delete_dir(p)), f"deleting {path}")


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


def under(base: str | Path, *parts: str) -> Path | str:
    """``base/part/…`` as a job passes it on: a resolved ``Path`` for a local base, the URI string
    for an object store (parts are plain names: run ids, ``checkpoints``, ``quarantine``)."""
    if is_uri(base):
        return join(base, *parts)
    return Path(str(base)).resolve().joinpath(*parts)


def local_dir(workdir: str | Path) -> Path:
    """Where a job keeps the files that must be local for a work folder ``workdir``: command and
    run logs (uploaded at the end), staging of exports and plots before upload. The folder
    itself when it is local; for a URI ``$TOKENREC_LOCAL_DIR/<hash of the URI>`` (default the
    system temp folder's ``tokenrec/``), so two work folders never share one."""
    if not is_uri(workdir):
        return Path(str(workdir))
    import hashlib
    import tempfile

    base = Path(os.environ.get("TOKENREC_LOCAL_DIR") or Path(tempfile.gettempdir()) / "tokenrec")
    return base / hashlib.sha1(str(workdir).rstrip("/").encode()).hexdigest()[:12]


MARKER = "_SUCCESS"  # the commit marker of a published folder on an object store (Hadoop's name)


def publish(src: str | Path, dest: str | Path, consume: bool = True) -> None:
    """Make the local folder ``src`` visible at ``dest`` as a whole, or not at all; ``src`` is
    consumed (kept with ``consume=False`` for an object-store ``dest``; a local one is always
    moved). Local: one ``os.replace`` (atomic on a POSIX filesystem). Object store (no rename):
    objects left by an earlier unpublished attempt are deleted, every file is uploaded, then the
    commit marker ``_SUCCESS`` (a JSON list of the files and their sizes) is written last —
    readers (``is_published_folder``) see the folder only once it is there. Raises
    ``FileExistsError`` when ``dest`` is already published: a published folder is never
    rewritten."""
    import shutil

    src = Path(src)
    if is_published_folder(dest):
        raise FileExistsError(f"{dest} is already published; a published folder is never rewritten")
    if not is_uri(dest):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        return
    delete(dest)  # orphans of an attempt that never wrote its marker
    files = {p.relative_to(src).as_posix(): p.stat().st_size for p in sorted(src.rglob("*")) if p.is_file()}
    import json

    try:
        upload(src, dest)
        write_text(join(dest, MARKER), json.dumps({"files": files}, indent=1))
    except BaseException:
        try:  # leave no orphans behind (best effort: a lost store keeps them, unpublished, until the next try)
            delete(dest)
        except Exception:  # noqa: BLE001 - the upload's own error is the one to report
            pass
        raise
    if consume:
        shutil.rmtree(src, ignore_errors=True)


def is_published_folder(path: str | Path) -> bool:
    """Whether ``publish`` finished for ``path``: a local folder that exists (it appears by one
    rename), or an object-store prefix with its commit marker."""
    if not is_uri(path):
        return Path(str(path)).is_dir()
    return exists(join(path, MARKER))


def fetch(path: str | Path, scratch: str | Path | None = None) -> Path:
    """A local folder holding the published folder ``path``: ``path`` itself when local, else a
    fresh download under ``scratch`` (default a new temp folder; the caller removes it). Raises
    ``FileNotFoundError`` when ``path`` is not published (missing, or an upload that never
    committed)."""
    if not is_published_folder(path):
        raise FileNotFoundError(f"{path} does not exist or was never published (no {MARKER} marker)")
    if not is_uri(path):
        return Path(str(path))
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="tokenrec-fetch-", dir=scratch))
    download(path, out)
    (out / MARKER).unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def fetched(path: str | Path):
    """``fetch`` as a context: the local folder holding the published folder ``path``; a
    temporary download (object storage) is removed on leaving. Raises ``FileNotFoundError`` when
    ``path`` is not published."""
    local = fetch(path)
    try:
        yield local
    finally:
        if is_uri(path):
            import shutil

            shutil.rmtree(local, ignore_errors=True)


def mirror(local: Path, workdir: str | Path, *parts: str) -> None:
    """Copy the local file ``local`` (a log written on the driver's disk) to ``workdir/parts…``
    when ``workdir`` is an object store; nothing for a local work folder or a missing file."""
    if is_uri(workdir) and local.exists():
        write_bytes(join(workdir, *parts), local.read_bytes())
