"""MLflow: the embedded default store, runs, parameters, and the model registry."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def default_tracking_uri(workdir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a tracking server: credentials stay in the environment,
    never in a config), else the embedded SQLite store in the work folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def redact(uri: str) -> str:
    """A tracking URI with any credentials removed, safe to print or log."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


def connect(tracking_uri: str, experiment: str, artifact_root: Path) -> tuple[MlflowClient, str]:
    """Client and experiment id; fails with a clear message when the store is unreachable."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
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
    """Batched per-step metric logging from the rank-0 worker."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(self.client, self.run_id, metrics, step)
