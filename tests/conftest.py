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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, for the whole session: its
    endpoint and credentials as environment variables (``AWS_ENDPOINT_URL`` is read by pyarrow,
    s3fs and boto3; MLflow reads ``MLFLOW_S3_ENDPOINT_URL``). The secret is planted so that tests
    can check it never reaches a log, a tag or an error message."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "tokenrec-test-key", "AWS_SECRET_ACCESS_KEY": "PLANTED-SECRET-9f3c1e",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    yield env
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """A fresh bucket on the session's S3 server, with its environment set for this test;
    returns ``s3://<bucket>``."""
    import re
    import uuid

    import boto3

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:30].strip("-") + f"-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
