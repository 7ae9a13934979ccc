"""Where a study's runs keep their results (``tokenrec tune``, issue 17): one JSON per job at
``<results>/jobs/<job>.json``, stamped with the job's ``fingerprint`` so that a study resumes
where it stopped and a result trained otherwise (settings, config, days or data changed) runs
again. Storage goes through ``embedding.storage`` (local paths or fsspec URLs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from embedding import storage
from embedding.typed_config import non_defaults
from pipeline.days import day_files, parse_days

if TYPE_CHECKING:
    from jobs.config import JobConfig
    from jobs.tune import Job


def fingerprint(cfg: JobConfig, data_root: Path) -> str:
    """What a job's result depends on: its resolved config (schema, model, training, days,
    ranges, seed) and its data (every training and evaluation day's files, by name and size —
    the same generated data in another folder matches). Config values equal to their declared
    defaults are left out (``non_defaults``), so a new config key with a default keeps saved
    results valid. A saved result with another fingerprint is stale: the job runs again."""
    import hashlib

    from jobs.train import eval_ranges

    days = parse_days(cfg.train.days)
    all_days = days + [d for ds in eval_ranges(cfg.train, days).values() for d in ds]
    files = [(f"{Path(str(f)).parent.name}/{Path(str(f)).name}", storage.size(f))
             for f in day_files(data_root, all_days)]
    settings = json.dumps(non_defaults(cfg), sort_keys=True)  # a key added later with its default
    return hashlib.sha256((settings + json.dumps(files)).encode()).hexdigest()[:16]  # changes nothing


def result_path(study_dir: Path, key: str):
    """Where job ``key``'s result is saved: ``<study_dir>/jobs/<key>.json``."""
    return storage.join(study_dir, "jobs", f"{key}.json")


def load_result(study_dir: Path, job: Job, stamp: str) -> dict | None:
    """The job's saved result, if it was trained as the job is now (``fingerprint``)."""
    path = result_path(study_dir, job.key)
    if not storage.exists(path):
        return None
    result = json.loads(storage.read_text(path))
    return result if result.get("fingerprint") == stamp else None


def pending(study_dir: Path, jobs: list[Job], stamps: dict, what: str, log) -> list[Job]:
    """The jobs without a saved result of today's fingerprint; says how many ran before and
    which saved results are stale (trained otherwise: they run again)."""
    todo = [j for j in jobs if load_result(study_dir, j, stamps[j.key]) is None]
    stale = [j.key for j in todo if storage.exists(result_path(study_dir, j.key))]
    if stale:
        log(f"{len(stale)} saved {what} results were trained otherwise (settings, config, days or data changed): "
            f"they run again ({', '.join(stale[:4])}{', …' if len(stale) > 4 else ''})")
    log(f"{what}: {len(jobs) - len(todo)} of {len(jobs)} done before, {len(todo)} to run")
    return todo
