"""MLflow: the embedded default store, runs, parameters, and the model registry.

Failure handling: ``connect`` fails fast, before any training, with a message naming the URI
(credentials redacted) when the store cannot be reached. Afterwards every client call goes
through ``RetryingClient``: a transient failure (connection refused or reset, timeout, HTTP 429 /
5xx, SQLite "database is locked") is retried with exponential backoff; other errors surface at
once. The per-step logger of the training worker never stops training: after its retries it
drops that step's metrics with a warning and counts them (``dropped``).
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

# The user's MLFLOW_TRACKING_URI, read once at import: mlflow.set_tracking_uri() writes the same
# variable into os.environ, so reading it later would return whatever store this process used last.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


def default_tracking_uri(workdir: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` as the process started with it (a tracking server: credentials
    stay in the environment, never in a config), else the embedded SQLite store in the work folder."""
    return USER_TRACKING_URI or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def redact(uri: str) -> str:
    """A tracking URI with any credentials removed, safe to print or log."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


TRANSIENT_MARKERS = ("database is locked", "connection refused", "connection reset", "connection aborted",
                     "timed out", "timeout", "temporarily unavailable", "too many requests",
                     "max retries exceeded", "bad gateway", "service unavailable", "gateway time-out",
                     "remote end closed", "broken pipe")


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}".lower()
    return any(m in text for m in TRANSIENT_MARKERS) or "temporarily_unavailable" in text


def with_retries(fn, *args, what: str = "MLflow call", attempts: int = 5, base_delay: float = 0.5,
                 log=None, **kwargs):
    """``fn(*args, **kwargs)``, retried on transient failures with exponential backoff
    (0.5, 1, 2, 4 s by default); other errors are raised at once."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e) or i == attempts - 1:
                raise
            delay = base_delay * 2**i
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
                f"{what} failed ({type(e).__name__}: {str(e)[:200]}); retry {i + 1}/{attempts - 1} in {delay:.1f}s")
            time.sleep(delay)


class RetryingClient:
    """An ``MlflowClient`` whose every method goes through ``with_retries``."""

    def __init__(self, client: MlflowClient, attempts: int = 5, base_delay: float = 0.5) -> None:
        self._client, self._attempts, self._base_delay = client, attempts, base_delay

    @property
    def tracking_uri(self) -> str:
        return self._client.tracking_uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return with_retries(attr, *args, what=f"MLflow {name}", attempts=self._attempts,
                                base_delay=self._base_delay, **kwargs)
        return call


def _probe(tracking_uri: str, timeout: float = 5.0, attempts: int = 3) -> None:
    """A tracking server answers ``/health``; fail fast (a few seconds) when it does not."""
    url = tracking_uri.rstrip("/") + "/health"
    for i in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                return
        except urllib.error.HTTPError:
            return  # it answered (a proxy or an older server without /health): reachable
        except OSError as e:
            if i == attempts - 1:
                raise RuntimeError(f"cannot reach the MLflow tracking server at {redact(tracking_uri)} ({e}); "
                                   f"start it or fix --tracking-uri / $MLFLOW_TRACKING_URI. Nothing was "
                                   f"trained.") from None
            time.sleep(1.0)


def connect(tracking_uri: str, experiment: str, artifact_root: Path) -> tuple[RetryingClient, str]:
    """Client and experiment id; fails with a clear message when the store is unreachable."""
    if tracking_uri.startswith(("http://", "https://")):
        _probe(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = RetryingClient(MlflowClient(tracking_uri))
    try:
        exp = client.get_experiment_by_name(experiment)
        # a local store keeps artifacts beside it; a tracking server picks its own artifact store
        location = artifact_root.resolve().as_uri() if is_local_store(tracking_uri) else None
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=location)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise RuntimeError(f"cannot reach the MLflow tracking store at {redact(tracking_uri)}: {e}") from None
    return client, exp_id


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
    ``<context> <days>``, source the data root, a digest of the range's files (names and sizes),
    the schema's columns, and a profile with the row and file counts. ``ranges``: context
    (``training``, or an evaluation range's name) → (days, files, rows)."""
    import hashlib
    import json

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

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
        digest = hashlib.sha256(json.dumps([(f"{Path(f).parent.name}/{Path(f).name}", Path(f).stat().st_size)
                                            for f in files]).encode()).hexdigest()[:16]
        ds = _Days(LocalArtifactDatasetSource(str(Path(data_root).resolve())), f"{context} {spec}", digest,
                   {"num_rows": int(rows), "num_files": len(files), "days": spec}, mlflow_schema)
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)
