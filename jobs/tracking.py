"""MLflow: the embedded default store, runs, parameters, and the model registry.

Failure handling: ``connect`` fails fast, before any training, with a message naming the URI
(credentials redacted) when the store cannot be reached. Afterwards every client call goes
through ``RetryingClient``: a transient failure (connection refused or reset, timeout, HTTP 429 /
5xx, SQLite "database is locked") is retried with exponential backoff; other errors surface at
once. The per-step logger of the training worker never stops training: after its retries it
drops that step's metrics with a warning and counts them (``dropped``).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from deploy.tracking import (  # noqa: F401  (re-exported: the jobs import them from here)
    TRANSIENT_MARKERS,
    USER_TRACKING_URI,
    RetryingClient,
    _probe,
    connect,
    default_tracking_uri,
    is_local_store,
    is_transient,
    redact,
    with_retries,
)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and len(v) > 8:
            out[key] = f"<{len(v)} items>"
        else:
            out[key] = str(v)[:500]
    return out


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int = 0) -> None:
    """The numeric entries of ``metrics`` in one batch (non-numbers are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                      if isinstance(v, (int, float))])


class StepLogger:
    """Per-step metric logging from the rank-0 worker, off the training thread. A tracking
    outage never stops training: each call is retried (``with_retries``); if it still fails,
    that step's metrics are dropped with a warning and counted in ``dropped``.

    ``log`` only queues: a background thread sends, so the step (and the other workers, who
    wait for rank 0 at the next collective) never waits for the tracking server. ``close``
    sends what is queued and returns. Up to ``max_queued`` steps wait; beyond that a new step's
    metrics are dropped with a warning rather than holding training back."""

    def __init__(self, tracking_uri: str, run_id: str, attempts: int = 4, base_delay: float = 0.5,
                 max_queued: int = 1000) -> None:
        self.client = RetryingClient(MlflowClient(tracking_uri), attempts=attempts, base_delay=base_delay)
        self.run_id, self.dropped = run_id, 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._send_all, name="tokenrec-step-logger", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        try:
            self._queue.put_nowait((step, metrics))
        except queue.Full:
            self._drop(step, "too many steps waiting for the tracking server")

    def close(self) -> None:
        """Send everything queued, then stop the thread."""
        self._queue.put((None, None))
        self._thread.join()

    def _send_all(self) -> None:
        while True:
            step, metrics = self._queue.get()
            if step is None:
                return
            try:
                log_metrics(self.client, self.run_id, metrics, step)
            except Exception as e:  # noqa: BLE001 - metrics are expendable, the training is not
                self._drop(step, f"{type(e).__name__}: {str(e)[:200]}")

    def _drop(self, step: int, why: str) -> None:
        self.dropped += 1
        print(f"warning: step {step} metrics not logged to MLflow ({why}); "
              f"training goes on ({self.dropped} step(s) dropped so far)", file=sys.stderr, flush=True)

def log_day_inputs(client: MlflowClient, run_id: str, data_root: Path, ranges: dict[str, tuple[list, list, int]],
                   schema=None) -> None:
    """Each day range of a run as an MLflow dataset input (the run page's "Datasets used"): name
    ``<context> <days>``, source the data root (a local folder or an ``s3://`` URI), a digest of
    the range's files (names and sizes),
    the schema's columns, and a profile with the row and file counts. ``ranges``: context
    (``training``, or an evaluation range's name) → (days, files, rows)."""
    import hashlib
    import json

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    from embedding import storage

    class _Days(MetaDataset):
        def __init__(self, source, name, digest, profile, schema) -> None:
            self._profile = profile
            super().__init__(source, name=name, digest=digest, schema=schema)

        @property
        def profile(self):
            return self._profile

        def to_dict(self) -> dict:
            return super().to_dict() | {"profile": json.dumps(self._profile)}

    mlflow_schema = None
    if schema is not None:  # the columns the schema reads, with their types
        from mlflow.types import ColSpec, Schema
        from mlflow.types.schema import Array

        kind = {"int64": "long", "string": "string"}
        cols = ([(c, "float") for c in schema.labels]
                + [(f.name, Array(kind[f.raw_type]) if f.multi_valued else kind[f.raw_type]) for f in schema.sparse]
                + [(c, "float") for c in schema.dense_names]
                + [(q.column(f), Array(kind[f.raw_type])) for q in schema.sequences for f in q.features])
        mlflow_schema = Schema([ColSpec(type=t, name=c) for c, t in dict(cols).items()])
    inputs = []
    for context, (days, files, rows) in ranges.items():
        spec = str(days[0]) if len(days) == 1 else f"{days[0]}..{days[-1]}"
        names = [f"{Path(str(f)).parent.name}/{Path(str(f)).name}" for f in files]
        sizes = [(n, storage.size(f)) for n, f in zip(names, files)]
        digest = hashlib.sha256(json.dumps(sizes).encode()).hexdigest()[:16]
        source = (resolve_dataset_source(str(data_root)) if storage.is_uri(data_root)  # e.g. S3ArtifactDatasetSource
                  else LocalArtifactDatasetSource(str(Path(data_root).resolve())))
        ds = _Days(source, f"{context} {spec}", digest,
                   {"num_rows": int(rows), "num_files": len(files), "days": spec}, mlflow_schema)
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)
