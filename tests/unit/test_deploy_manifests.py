"""The KubeRay manifests (``deploy/k8s``) parse, and the object-storage one shares nothing but
the store: no volume besides Ray's ``/dev/shm``, the logs and the work folder as ``s3://`` URIs,
the credentials only from Secrets (never a literal value), on every pod that runs Ray processes;
its ``--set`` overrides load with the config it names (a typo would fail the job on the cluster)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from jobs.config import load_config

ROOT = Path(__file__).resolve().parents[2]
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
          "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}


def _job(name: str) -> dict:
    (job,) = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s" / name).read_text()) if d["kind"] == "RayJob"]
    return job


def _pods(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def _args(job: dict) -> list[str]:
    (command,) = shlex.split(job["spec"]["entrypoint"])[2:]  # bash -c '…'
    return shlex.split(command.replace('"${MLFLOW_TRACKING_URI:?}"', "URI"))


def test_the_object_storage_rayjob_shares_only_the_store() -> None:
    job = _job("rayjob.yaml")
    args = _args(job)
    flags = dict(zip(args[3::2], args[4::2], strict=True))
    assert args[:3] == ["exec", "tokenrec", "daily"]
    assert flags["--data"].startswith("s3://") and flags["--workdir"].startswith("s3://")
    assert flags["--tracking-uri"] == "URI", "an s3:// work folder needs a tracking server"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "train.placement_strategy=SPREAD" in sets
    cfg = load_config(ROOT / flags["--config"].removeprefix("/opt/tokenrec/"), sets)
    assert cfg.train.placement_strategy == "SPREAD"
    for pod in _pods(job):
        assert [v["name"] for v in pod["volumes"]] == ["dshm"], "no shared volume"
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert S3_ENV <= set(env), S3_ENV - set(env)
            assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in env.values()), \
                "credentials and endpoints come from Secrets only"


def test_the_shared_filesystem_rayjob_mounts_one_volume_everywhere() -> None:
    job = _job("rayjob-shared-fs.yaml")
    args = _args(job)
    assert args[args.index("--data") + 1].startswith("/mnt/shared/")
    assert args[args.index("--workdir") + 1].startswith("/mnt/shared/")
    for pod in _pods(job):
        for container in pod["containers"]:
            assert "/mnt/shared" in [m["mountPath"] for m in container["volumeMounts"]]
