"""``tokenrec data fetch ml-100k``: get MovieLens and convert it to day-partitioned logs.

Without ``--source``, ML-100K comes from the ``recbole==1.2.1`` wheel on PyPI (it ships RecBole's
atomic copy under ``recbole/dataset_example/ml-100k/``): ``pip download --no-deps`` into the
cache, extract those files, convert. With ``--source FOLDER`` a local GroupLens (``u.data`` …,
``ratings.dat`` …) or RecBole folder is converted instead — the only way to ML-1M.

MovieLens is GroupLens's data: free for research, not to be redistributed. It stays in the
cache folder (default ``~/.cache/tokenrec``), never in the repository.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from pipeline.datasets.movielens import READERS, detect, to_logs

RECBOLE = "recbole==1.2.1"
DATASETS = ("ml-100k", "ml-1m")
DEFAULT_CACHE = Path.home() / ".cache" / "tokenrec"


def download_recbole_100k(cache: Path, log=print) -> Path:
    """The RecBole copy of ML-100K, extracted under ``cache/recbole-ml-100k``."""
    target = cache / "recbole-ml-100k"
    if (target / "ml-100k.inter").is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    if not found:
        log(f"downloading {RECBOLE} (no dependencies) into {wheels}")
        r = subprocess.run([sys.executable, "-m", "pip", "download", RECBOLE, "--no-deps", "-d", str(wheels)],
                           capture_output=True, text=True)
        found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
        if r.returncode != 0 or not found:
            raise RuntimeError(f"pip download {RECBOLE} failed (is PyPI reachable?): {r.stderr[-1500:]}\n"
                               f"Alternatively pass --source with a MovieLens folder from grouplens.org.")
    prefix = "recbole/dataset_example/ml-100k/"
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z:
        for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
            (target / name).write_bytes(z.read(prefix + name))
    log(f"extracted ML-100K (RecBole atomic files) into {target}")
    return target


def fetch(dataset: str, out: Path | None = None, source: Path | None = None, cache: Path = DEFAULT_CACHE,
          max_len: int = 50, log=print) -> dict:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset}'; choose one of {DATASETS}")
    if source is None:
        if dataset != "ml-100k":
            raise ValueError(f"{dataset} is not on PyPI: download it from grouplens.org (research use, "
                             f"no redistribution) and pass --source FOLDER")
        source = download_recbole_100k(cache, log)
    kind = detect(source)
    if dataset == "ml-1m" and kind != "grouplens-1m":
        raise ValueError(f"{source} holds {kind} data, not ML-1M (ratings.dat, users.dat, movies.dat)")
    out = out or cache / dataset / "logs"
    if out.exists() and any(out.glob("day=*")):
        raise FileExistsError(f"{out} already holds day partitions; remove it or pick another --out")
    log(f"converting {kind} from {source}")
    report = to_logs(READERS[kind](source), out, max_len=max_len, log=log)
    return report | {"out": str(out), "source": str(source), "format": kind}
