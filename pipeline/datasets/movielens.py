"""MovieLens → the project's log format (``docs/data-format.md``), schema ``configs/movielens.toml``.

Readers (each returns ``MovieLens``: ratings, users, items as pandas frames):

* ``read_grouplens_100k(folder)`` — ``u.data`` (tab), ``u.user`` and ``u.item`` (``|``, latin-1;
  19 genre flags; release date ``01-Jan-1995``);
* ``read_recbole_100k(folder)`` — RecBole's atomic copy ``ml-100k.inter/.user/.item`` (tab, a
  header of ``name:type``; genres space-separated);
* ``read_grouplens_1m(folder)`` — ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``,
  latin-1; age codes; occupation codes; ``Title (Year)``; genres ``|``-separated).

``to_logs`` writes one row per rating: label ``click = rating >= 4``; fields user id, item id,
age bucket, gender, occupation, zip prefix, genres (multi-hot), release year; dense
``log1p(#earlier ratings of the user)`` and the item's age at rating time (years / 10); the sequence
``hist`` of the user's earlier items — strictly earlier timestamps, newest last, at most
``max_len`` — with each item's first genre and the user's rating of it (the action). Rows go to
``day=YYYY-MM-DD`` partitions by their UTC timestamp; a day of the span without ratings gets an
empty partition, so that day ranges are contiguous.

The data is GroupLens's (research use, no redistribution): it is never committed; ``tokenrec data
fetch`` puts it in a cache folder.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")
AGES_1M = {1: 0, 18: 18, 25: 25, 35: 35, 45: 45, 50: 50, 56: 56}  # code → lower bound of the band (the bucket)


@dataclass
class MovieLens:
    ratings: pd.DataFrame  # user (int), item (int), rating (int), ts (int, unix seconds)
    users: pd.DataFrame  # user, age (int: the age bucket), gender (str), occupation (str), zip (str)
    items: pd.DataFrame  # item, year (int, 0 when unknown), genres (list[str])


def _need(folder: Path, *names: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing}; expected a MovieLens folder with {list(names)}")


def read_grouplens_100k(folder: str | Path) -> MovieLens:
    folder = Path(folder)
    _need(folder, "u.data", "u.user", "u.item")
    ratings = pd.read_csv(folder / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    users = pd.read_csv(folder / "u.user", sep="|", names=["user", "age", "gender", "occupation", "zip"],
                        dtype={"zip": str})
    users["age"] = users["age"] // 10 * 10  # decade
    cols = ["item", "title", "release", "video", "url", *GENRES_100K]
    raw = pd.read_csv(folder / "u.item", sep="|", names=cols, encoding="latin-1", dtype={"release": str})
    year = pd.to_datetime(raw["release"], format="%d-%b-%Y", errors="coerce").dt.year
    flags = raw[list(GENRES_100K)].to_numpy().astype(bool)
    genres = [[g for g, on in zip(GENRES_100K, row) if on] for row in flags]
    items = pd.DataFrame({"item": raw["item"], "year": year.fillna(0).astype(int), "genres": genres})
    return MovieLens(ratings, users, items)


def _atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def read_recbole_100k(folder: str | Path) -> MovieLens:
    folder = Path(folder)
    _need(folder, "ml-100k.inter", "ml-100k.user", "ml-100k.item")
    inter = _atomic(folder / "ml-100k.inter")
    ratings = pd.DataFrame({"user": inter["user_id"].astype(int), "item": inter["item_id"].astype(int),
                            "rating": inter["rating"].astype(float).astype(int),
                            "ts": inter["timestamp"].astype(float).astype(int)})
    u = _atomic(folder / "ml-100k.user")
    users = pd.DataFrame({"user": u["user_id"].astype(int), "age": u["age"].astype(int) // 10 * 10,
                          "gender": u["gender"],
                          "occupation": u["occupation"], "zip": u["zip_code"]})
    i = _atomic(folder / "ml-100k.item")
    year = pd.to_numeric(i["release_year"], errors="coerce").fillna(0).astype(int)
    items = pd.DataFrame({"item": i["item_id"].astype(int), "year": year,
                          "genres": [g.split() if g else ["unknown"] for g in i["class"]]})
    return MovieLens(ratings, users, items)


def read_grouplens_1m(folder: str | Path) -> MovieLens:
    folder = Path(folder)
    _need(folder, "ratings.dat", "users.dat", "movies.dat")

    def dat(name: str, cols: list[str]) -> pd.DataFrame:
        lines = (folder / name).read_text(encoding="latin-1").splitlines()
        return pd.DataFrame([ln.split("::") for ln in lines if ln], columns=cols)

    r = dat("ratings.dat", ["user", "item", "rating", "ts"]).astype(int)
    u = dat("users.dat", ["user", "gender", "age", "occupation", "zip"])
    users = pd.DataFrame({"user": u["user"].astype(int), "age": u["age"].astype(int).map(AGES_1M).fillna(0).astype(int),
                          "gender": u["gender"], "occupation": u["occupation"], "zip": u["zip"]})
    m = dat("movies.dat", ["item", "title", "genres"])
    year = m["title"].map(lambda t: int(x.group(1)) if (x := re.search(r"\((\d{4})\)\s*$", t)) else 0)
    items = pd.DataFrame({"item": m["item"].astype(int), "year": year,
                          "genres": [g.split("|") for g in m["genres"]]})
    return MovieLens(r, users, items)


READERS = {"grouplens-100k": read_grouplens_100k, "recbole-100k": read_recbole_100k,
           "grouplens-1m": read_grouplens_1m}


def detect(folder: str | Path) -> str:
    """Which reader a folder needs, from the files it holds."""
    folder = Path(folder)
    for name, marker in (("grouplens-100k", "u.data"), ("recbole-100k", "ml-100k.inter"),
                         ("grouplens-1m", "ratings.dat")):
        if (folder / marker).is_file():
            return name
    raise FileNotFoundError(f"{folder} holds no MovieLens data (u.data, ml-100k.inter or ratings.dat)")


def build_rows(ml: MovieLens, max_len: int = 50) -> pa.Table:
    """The log table: one row per rating, sorted by (user, ts, item)."""
    r = ml.ratings.sort_values(["user", "ts", "item"], kind="stable").reset_index(drop=True)
    users = ml.users.set_index("user")
    items = ml.items.set_index("item")
    unknown_users = set(r["user"]) - set(users.index)
    unknown_items = set(r["item"]) - set(items.index)
    if unknown_users or unknown_items:
        raise ValueError(f"ratings name users {sorted(unknown_users)[:5]} / items {sorted(unknown_items)[:5]} "
                         f"missing from the user / item files")
    n = len(r)
    user = r["user"].to_numpy()
    ts = r["ts"].to_numpy()
    # history of row i: the same user's rows with a strictly earlier timestamp, the newest max_len
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]  # first row of each user
    user_start = np.repeat(first, np.diff(np.r_[first, n]))
    key = user.astype(np.int64) * (1 << 34) + ts.astype(np.int64)  # (user, ts) order = row order
    end = np.searchsorted(key, key, side="left")  # first row of this user with ts >= ts_i
    start = np.maximum(user_start, end - max_len)
    lengths = end - start
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    idx = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths) + np.repeat(start, lengths)

    item_ids = r["item"].to_numpy()
    genres = items.loc[item_ids, "genres"].to_list()
    first_genre = np.array([g[0] if g else "unknown" for g in genres], dtype=object)
    year = items.loc[item_ids, "year"].to_numpy()
    u = users.loc[user]
    rating_year = pd.to_datetime(ts, unit="s", utc=True).year.to_numpy()
    item_age = np.where(year > 0, (rating_year - year) / 10.0, 0.0).astype(np.float32)

    def lists(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[idx], type=type_))

    return pa.table({
        "user_id": pa.array(user, pa.int64()),
        "item_id": pa.array(item_ids, pa.int64()),
        "age": pa.array(u["age"].to_numpy(), pa.int64()),  # ML-100K: decade; ML-1M: its age band
        "gender": pa.array(u["gender"].astype(str).to_numpy(), pa.string()),
        "occupation": pa.array(u["occupation"].astype(str).to_numpy(), pa.string()),
        "zip_prefix": pa.array(u["zip"].astype(str).str[:2].to_numpy(), pa.string()),
        "genres": pa.array(genres, pa.list_(pa.string())),
        "release_year": pa.array(year, pa.int64()),
        "user_activity": pa.array(np.log1p(end - user_start).astype(np.float32)),
        "item_age": pa.array(item_age),
        "hist_item_id": lists(item_ids, pa.int64()),
        "hist_genre": lists(first_genre, pa.string()),
        "hist_rating": lists(r["rating"].to_numpy(), pa.int64()),
        "click": pa.array((r["rating"].to_numpy() >= 4).astype(np.float32)),
        "ts": pa.array(ts, pa.int64()),
    })


def to_logs(ml: MovieLens, out: str | Path, max_len: int = 50, log=print) -> dict:
    """Write ``out/day=YYYY-MM-DD/part-00000.parquet``; returns counts per day and in all."""
    table = build_rows(ml, max_len)
    days = pd.to_datetime(table.column("ts").to_numpy(), unit="s", utc=True).strftime("%Y-%m-%d").to_numpy()
    order = np.argsort(days, kind="stable")
    table, days = table.take(pa.array(order)), days[order]
    out = Path(out)
    bounds = np.r_[0, np.flatnonzero(days[1:] != days[:-1]) + 1, len(days)]
    per_day = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        d = out / f"day={days[a]}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(a, b - a), d / "part-00000.parquet")
        per_day[str(days[a])] = int(b - a)
    first, last = dt.date.fromisoformat(min(per_day)), dt.date.fromisoformat(max(per_day))
    for k in range((last - first).days + 1):  # days without ratings: empty partitions, so that
        day = (first + dt.timedelta(days=k)).isoformat()  # every day of the span exists
        if day not in per_day:
            (out / f"day={day}").mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(0, 0), out / f"day={day}" / "part-00000.parquet")
            per_day[day] = 0
    per_day = dict(sorted(per_day.items()))
    log(f"wrote {table.num_rows:,} rows in {len(per_day)} day partitions "
        f"({min(per_day)} .. {max(per_day)}) under {out}")
    return {"rows": table.num_rows, "days": per_day}


def chronological_split(days: list[dt.date], train: float = 0.8, valid: float = 0.1
                        ) -> tuple[list[dt.date], list[dt.date], list[dt.date]]:
    """Consecutive days → (train, validation, test): the earliest ``train`` share of the time
    span, the next ``valid`` share, the rest. Disjoint and in time order, so no row of a later
    period can be trained on (each row's history is strictly earlier than the row)."""
    days = sorted(days)
    n = len(days)
    a, b = round(n * train), round(n * (train + valid))
    if not 0 < a < b < n:
        raise ValueError(f"{n} days cannot be split {train:.0%}/{valid:.0%}/{1 - train - valid:.0%}")
    return days[:a], days[a:b], days[b:]
