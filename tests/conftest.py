from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_toml() -> Path:
    return ROOT / "configs" / "tiny.toml"


@pytest.fixture(autouse=True)
def _isolated_tracking_env(monkeypatch):
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ; without this, a
    test's store would leak into the next test's subprocesses (which inherit the environment)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
