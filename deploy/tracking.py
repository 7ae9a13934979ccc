"""The MLflow connection: the tracking URI (embedded SQLite default, the user's
``MLFLOW_TRACKING_URI``), a fail-fast ``connect``, and ``RetryingClient`` / ``with_retries``
for transient failures (connection refused or reset, timeout, HTTP 429 / 5xx, SQLite "database
is locked": retried with exponential backoff; other errors surface at once).

Below ``jobs/`` so that serving (``deploy.export.register_export``) does not import the trainer;
``jobs.tracking`` re-exports these for the jobs.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

# The user's MLFLOW_TRACKING_URI, read once at import: mlflow.set_tracking_uri() writes the same
# variable into os.environ, so reading it later would return whatever store this process used last.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


def default_tracking_uri(workdir: Path | str) -> str:
    """``$MLFLOW_TRACKING_URI`` as the process started with it (a tracking server: credentials
    stay in the environment, never in a config), else the embedded SQLite store in the work folder.
    Raises ``ValueError`` for an object-store work folder without either: SQLite needs a local
    file (and one store every node reaches: a tracking server)."""
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    if "://" in str(workdir) and not str(workdir).startswith("file://"):
        raise ValueError(f"--workdir {workdir} is on object storage, where the default MLflow store (SQLite in the "
                         "work folder) cannot live: give --tracking-uri (an MLflow tracking server every node "
                         "reaches, e.g. http://mlflow:5000) or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{(Path(workdir) / 'mlflow.db').resolve()}"


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


def connect(tracking_uri: str, experiment: str, artifact_root: Path | str) -> tuple[RetryingClient, str]:
    """Client and experiment id; fails with a clear message when the store is unreachable. A new
    experiment keeps its artifacts under ``artifact_root`` when that is an object-store URI (the
    work folder's store: MLflow's client writes there itself, with boto3 for ``s3://`` —
    ``MLFLOW_S3_ENDPOINT_URL`` names an S3-compatible endpoint) or when the store is local; a
    tracking server otherwise picks its own artifact store. An existing experiment keeps its own."""
    if tracking_uri.startswith(("http://", "https://")):
        _probe(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = RetryingClient(MlflowClient(tracking_uri))
    try:
        exp = client.get_experiment_by_name(experiment)
        # a local store keeps artifacts beside it; a tracking server picks its own artifact store
        remote = "://" in str(artifact_root) and not str(artifact_root).startswith("file://")
        location = (str(artifact_root).rstrip("/") if remote
                    else Path(artifact_root).resolve().as_uri() if is_local_store(tracking_uri) else None)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=location)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise RuntimeError(f"cannot reach the MLflow tracking store at {redact(tracking_uri)}: {e}") from None
    return client, exp_id
