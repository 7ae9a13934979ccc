"""``embedding.storage`` on a local folder and on a real S3-compatible server (moto, 127.0.0.1):
the same files, listings, atomic single-file writes, deletes, uploads and downloads; transient
errors retried with backoff, others raised at once."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from embedding import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/store"


def test_write_list_read_delete(base: str, tmp_path: Path) -> None:
    assert not storage.exists(base) and storage.files_under(base) == [] and not storage.isdir(base)
    storage.write_text(storage.join(base, "day=2026-01-01", "part-0.parquet"), "a")
    storage.write_text(storage.join(base, "day=2026-01-01", "hour=23", "part-1.parquet"), "b")
    storage.write_bytes(storage.join(base, "meta.json"), b"{}")
    assert storage.isdir(base) and storage.isdir(storage.join(base, "day=2026-01-01"))
    assert storage.files_under(base) == ["day=2026-01-01/hour=23/part-1.parquet", "day=2026-01-01/part-0.parquet",
                                         "meta.json"]
    assert storage.names(base) == ["day=2026-01-01", "meta.json"]
    assert storage.read_text(storage.join(base, "day=2026-01-01", "hour=23", "part-1.parquet")) == "b"
    storage.write_text(storage.join(base, "meta.json"), "{\"v\": 2}")  # overwritten as a whole
    assert storage.read_text(storage.join(base, "meta.json")) == "{\"v\": 2}"
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(base, "missing.json"))

    local = tmp_path / "down"
    storage.download(storage.join(base, "day=2026-01-01"), local)
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == \
        ["hour=23/part-1.parquet", "part-0.parquet"]
    storage.upload(local, storage.join(base, "copy"))
    assert storage.files_under(storage.join(base, "copy")) == ["hour=23/part-1.parquet", "part-0.parquet"]

    storage.delete(storage.join(base, "day=2026-01-01"))
    storage.delete(storage.join(base, "never-written"))  # nothing there: not an error
    assert storage.files_under(base) == ["copy/hour=23/part-1.parquet", "copy/part-0.parquet", "meta.json"]


def test_uri_helpers() -> None:
    assert storage.is_uri("s3://b/k") and not storage.is_uri("/tmp/x") and not storage.is_uri("file:///tmp/x")
    assert storage.join("s3://b/k/", "day=1", "f") == "s3://b/k/day=1/f"
    with pytest.raises(ValueError, match="cannot open this location"):
        storage.filesystem("nosuchscheme://x/y")


@pytest.mark.parametrize("error,again", [
    (OSError("When reading information for key 'x' in bucket 'b': AWS Error SLOW_DOWN during HeadObject "
             "operation: Please reduce your request rate."), True),
    (OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation"), True),
    (OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server"), True),
    (OSError("An error occurred (SlowDown) when calling the PutObject operation (HTTP 503)"), True),
    (ConnectionResetError("reset by peer"), True),
    # a key name holding "500" or "timeout" is not an HTTP 500 or a timeout
    (OSError("When reading information for key 'logs/step-00000500/timeout.json' in bucket 'b': AWS Error "
             "ACCESS_DENIED during HeadObject operation"), False),
    (OSError("HTTP 404 not found"), False),
    (FileNotFoundError("x"), False),
    (ValueError("bad"), False),
])
def test_what_is_transient(error: BaseException, again: bool) -> None:
    assert storage.transient(error) is again


def test_a_location_never_carries_credentials() -> None:
    assert storage.location("s3://b/logs/") == "s3://b/logs" and storage.location("/tmp/x") == Path("/tmp/x")
    with pytest.raises(ValueError, match="must not carry credentials") as e:
        storage.location("s3://AKIAXXXX:PLANTED-SECRET@bucket/logs")
    assert "PLANTED-SECRET" not in str(e.value) and "AKIAXXXX" not in str(e.value)


def test_transient_errors_are_retried_and_others_are_not() -> None:
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("When reading information for key 'x': AWS Error SLOW_DOWN (HTTP 503): SlowDown")
        return "ok"
    assert storage.retry(flaky, "reading x", base_delay=0.001) == "ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("x")
    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "reading x", base_delay=0.001)
    assert len(calls) == 1

    def always():
        raise ConnectionResetError("connection reset by peer")
    with pytest.raises(ConnectionResetError) as e:  # the type is kept, the attempts noted
        storage.retry(always, "reading x", attempts=3, base_delay=0.001)
    assert "reading x: failed after 3 attempts" in e.value.__notes__


def test_day_partitions_on_s3_list_and_check_like_the_same_files_on_disk(s3_bucket: str, tmp_path: Path) -> None:
    from jobs.config import load_config
    from pipeline.days import day_files, parse_days
    from pipeline.generator import generate
    from pipeline.validate import check_files

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/tiny.toml")
    local = tmp_path / "logs"
    generate(cfg.schema, cfg.generator, local, parse_days("2026-01-01..2026-01-02"), log=lambda *_: None)
    (local / "day=2026-01-02" / "_SUCCESS").write_text("")  # a writer's marker: ignored
    (local / "day=2026-01-02" / "notes.txt").write_text("x")  # not Parquet: reported
    first = next((local / "day=2026-01-01").glob("*.parquet"))
    first.rename(first.with_name("part #1?%3A.parquet"))  # characters a URI must encode
    storage.upload(local, s3_bucket + "/logs")
    days = parse_days("2026-01-01..2026-01-02")
    said_local, said_s3 = [], []
    on_disk = day_files(local, days, log=said_local.append)
    on_s3 = day_files(s3_bucket + "/logs", days, log=said_s3.append)
    assert [str(p.relative_to(local)) for p in on_disk] == \
        [unquote(f.removeprefix(s3_bucket + "/logs/")) for f in on_s3]
    assert len(on_s3) >= 2 and all(f.startswith("s3://") for f in on_s3)
    assert len(said_s3) == len(said_local) == 1 and "notes.txt" in said_s3[0]
    assert check_files(on_s3, cfg.schema, log=lambda *_: None) == check_files(on_disk, cfg.schema, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="no data for day 2026-01-03"):
        day_files(s3_bucket + "/logs", parse_days("2026-01-03"))


def test_publish_is_all_or_nothing_and_never_rewrites(base: str, tmp_path: Path) -> None:
    """``publish`` (exports): a folder becomes visible whole — one rename on disk, the files then
    the ``_SUCCESS`` marker on the store; an upload that died before its marker is invisible
    (``is_published_folder``, ``fetch`` refuses it) and its orphans are deleted by the next
    publish; a published folder is never rewritten; ``fetch`` gives the same files back."""
    def staged(tag: str) -> Path:
        src = tmp_path / f"staging-{tag}"
        (src / "sub").mkdir(parents=True)
        (src / "model.pt").write_text(tag)
        (src / "sub" / "meta.json").write_text("{}")
        return src

    dest = storage.join(base, "runs", "r1", "export")
    if base.startswith("s3://"):  # a crashed attempt: files, no marker
        storage.write_text(storage.join(dest, "model.pt"), "half")
        storage.write_text(storage.join(dest, "orphan.bin"), "x")
    # on disk the folder appears by one rename: a crashed attempt leaves only its staging folder
    assert not storage.is_published_folder(dest)
    with pytest.raises(FileNotFoundError, match="never published"):
        storage.fetch(dest)
    storage.publish(staged("v1"), dest)
    assert storage.is_published_folder(dest)
    assert not (tmp_path / "staging-v1").exists(), "the staging folder is consumed"
    assert set(storage.files_under(dest)) - {storage.MARKER} == {"model.pt", "sub/meta.json"}, "orphans deleted"
    with pytest.raises(FileExistsError, match="never rewritten"):
        storage.publish(staged("v2"), dest)
    local = storage.fetch(dest)
    assert (local / "model.pt").read_text() == "v1" and (local / "sub" / "meta.json").exists()
    assert not (local / storage.MARKER).exists()


def test_local_dir_is_the_folder_or_one_per_uri(tmp_path: Path, monkeypatch) -> None:
    assert storage.local_dir(tmp_path / "work") == tmp_path / "work"
    monkeypatch.setenv("TOKENREC_LOCAL_DIR", str(tmp_path / "local"))
    a, b = storage.local_dir("s3://bucket/a"), storage.local_dir("s3://bucket/b")
    assert a.parent == b.parent == tmp_path / "local" and a != b
    assert storage.local_dir("s3://bucket/a/") == a
    assert storage.under("s3://bucket/a", "runs", "r") == "s3://bucket/a/runs/r"
    assert storage.under(tmp_path / "w", "runs") == (tmp_path / "w" / "runs").resolve()


def test_a_publish_whose_upload_fails_leaves_no_orphans(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "staging"
    src.mkdir()
    for i in range(3):
        (src / f"part-{i}.bin").write_text(str(i))
    dest = s3_bucket + "/runs/r2/export"
    real = storage.upload

    def dies_half_way(local_dir, to):
        storage.write_text(storage.join(to, "part-0.bin"), "0")  # one object made it before the failure
        raise ConnectionError("connection reset by peer")
    monkeypatch.setattr(storage, "upload", dies_half_way)
    with pytest.raises(ConnectionError):
        storage.publish(src, dest)
    monkeypatch.setattr(storage, "upload", real)
    assert storage.files_under(dest) == [] and not storage.is_published_folder(dest)
    assert src.is_dir(), "the staged files are kept for another try"
    storage.publish(src, dest)
    assert storage.is_published_folder(dest)
