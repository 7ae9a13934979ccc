"""MovieLens converters on small worked examples of each input format, and no leakage: every
history element is strictly earlier than its row, and the chronological split is disjoint."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embedding.schema import load_schema
from pipeline.datasets.movielens import (
    GENRES_100K,
    build_rows,
    chronological_split,
    detect,
    read_grouplens_1m,
    read_grouplens_100k,
    read_recbole_100k,
    to_logs,
)
from pipeline.validate import check_files, split_valid

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400
T0 = 880_000_000  # 1997-11-20
# user 1 rates 10, 20, 30 (20 and 30 in the same second), then 10 again a day later; user 2 rates 20
RATINGS = [(1, 10, 5, T0), (1, 20, 3, T0 + 60), (1, 30, 4, T0 + 60), (2, 20, 4, T0 + 30), (1, 10, 2, T0 + DAY)]


def flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in GENRES_100K)


@pytest.fixture
def grouplens_100k(tmp_path: Path) -> Path:
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (tmp_path / "u.item").write_bytes(
        ("10|Café Society (1995)|01-Jan-1995||http://x|" + flags("Comedy", "Drama") + "\n"
         "20|Toy Story (1995)|01-Jan-1995||http://x|" + flags("Animation", "Children's", "Comedy") + "\n"
         "30|unknown|||http://x|" + flags("unknown") + "\n").encode("latin-1"))
    return tmp_path


def test_grouplens_100k(grouplens_100k: Path) -> None:
    assert detect(grouplens_100k) == "grouplens-100k"
    ml = read_grouplens_100k(grouplens_100k)
    items = ml.items.set_index("item")
    assert items.loc[20, "genres"] == ["Animation", "Children's", "Comedy"]  # multi-hot flags
    assert items.loc[10, "year"] == 1995 and items.loc[30, "year"] == 0  # missing date
    rows = build_rows(ml, max_len=2).to_pylist()
    u1 = [r for r in rows if r["user_id"] == 1]
    assert [r["item_id"] for r in u1] == [10, 20, 30, 10]
    assert [r["hist_item_id"] for r in u1] == [[], [10], [10], [20, 30]]  # max_len 2, newest last
    assert u1[2]["hist_item_id"] == [10]  # 20 has the same timestamp as 30: not earlier, not history
    assert [r["hist_rating"] for r in u1][3] == [3, 4] and u1[3]["hist_genre"] == ["Animation", "unknown"]
    assert [r["click"] for r in u1] == [1.0, 0.0, 1.0, 0.0]
    assert u1[0]["age"] == 20 and u1[0]["gender"] == "M" and u1[0]["zip_prefix"] == "85"
    assert u1[0]["genres"] == ["Comedy", "Drama"] and u1[0]["release_year"] == 1995


def test_recbole_atomic_files(tmp_path: Path) -> None:
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (tmp_path / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n")
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tCafe Society\t1995\tComedy Drama\n20\tToy Story\t1995\tAnimation Children's Comedy\n30\tx\t\t\n")
    assert detect(tmp_path) == "recbole-100k"
    ml = read_recbole_100k(tmp_path)
    items = ml.items.set_index("item")
    assert items.loc[20, "genres"] == ["Animation", "Children's", "Comedy"]
    assert items.loc[30, "genres"] == ["unknown"] and items.loc[30, "year"] == 0
    rows = build_rows(ml, max_len=2).to_pylist()
    assert [r["hist_item_id"] for r in rows if r["user_id"] == 1] == [[], [10], [10], [20, 30]]


def test_grouplens_1m(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (tmp_path / "movies.dat").write_bytes(
        "10::Café Society (1995)::Comedy|Drama\n20::Toy Story (1995)::Animation|Children's|Comedy\n"
        "30::City of Lost Children, The (1995)::Adventure|Sci-Fi\n".encode("latin-1"))
    assert detect(tmp_path) == "grouplens-1m"
    ml = read_grouplens_1m(tmp_path)
    users = ml.users.set_index("user")
    assert users.loc[1, "age"] == 0 and users.loc[2, "age"] == 56  # age codes → band start
    assert ml.items.set_index("item").loc[30, "genres"] == ["Adventure", "Sci-Fi"]
    rows = build_rows(ml).to_pylist()
    assert rows[0]["release_year"] == 1995 and rows[0]["occupation"] == "10"


def test_no_leakage_and_valid_logs(grouplens_100k: Path, tmp_path: Path) -> None:
    """Brute force over a denser example: each history is exactly the user's strictly earlier
    ratings (newest max_len); the written days pass the schema's validation."""
    import random

    rnd = random.Random(0)
    lines = []
    for _ in range(300):  # timestamps on a 7-second grid: many same-second ratings
        ts = T0 + rnd.randint(0, 5 * DAY) // 7 * 7
        lines.append(f"{rnd.randint(1, 2)}\t{rnd.choice([10, 20, 30])}\t{rnd.randint(1, 5)}\t{ts}\n")
    (grouplens_100k / "u.data").write_text("".join(lines))
    ml = read_grouplens_100k(grouplens_100k)
    table = build_rows(ml, max_len=5)
    rows = table.to_pylist()
    r = ml.ratings.sort_values(["user", "ts", "item"], kind="stable").to_dict("records")
    for row in rows:
        earlier = [x for x in r if x["user"] == row["user_id"] and x["ts"] < row["ts"]]
        assert row["hist_item_id"] == [x["item"] for x in earlier][-5:]
        assert row["hist_rating"] == [x["rating"] for x in earlier][-5:]
    report = to_logs(ml, tmp_path / "logs", max_len=5, log=lambda *_: None)
    files = sorted((tmp_path / "logs").glob("day=*/*.parquet"))
    assert len(files) == len(report["days"]) == 6  # every day of the span, empty ones included
    schema = load_schema(ROOT / "configs/movielens.toml")
    assert check_files(files, schema) == 300
    for f in files:
        good, bad = split_valid(pq.read_table(f), schema)
        assert bad.num_rows == 0
        day = f.parent.name.removeprefix("day=")
        ts = good.column("ts").to_pylist()
        assert all(dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat() == day for t in ts)


def test_chronological_split_is_disjoint_and_ordered() -> None:
    days = [dt.date(1997, 9, 20) + dt.timedelta(days=k) for k in range(215)]
    train, valid, test = chronological_split(days)
    assert (len(train), len(valid), len(test)) == (172, 22, 21)
    assert max(train) < min(valid) and max(valid) < min(test)
    assert set(train) | set(valid) | set(test) == set(days)
    with pytest.raises(ValueError, match="cannot be split"):
        chronological_split(days[:3])
