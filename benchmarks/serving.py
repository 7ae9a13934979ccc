"""Serving latency: ``mlflow models serve`` of a registered version, requests of 1 and 256 rows.

    .venv/bin/python benchmarks/serving.py [--requests 200] [--tower dlrm]

The demo model (``configs/demo_world.toml``; weights as initialised — latency does not depend on them)
is exported (``deploy.export``: the ``torch.export`` program), logged and registered in a SQLite
MLflow store in a temp folder, aliased ``champion`` and served by ``mlflow models serve
--env-manager local`` on 127.0.0.1 (one uvicorn worker). A client in this process sends JSON
``dataframe_records`` requests one after another (after 20 warm-up requests) and times each
round trip; the exported program's own time on the same rows, in this process, is given beside it.
Writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "tokenrec-latency"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_serve(tracking_uri: str, model_uri: str, timeout_s: float = 180):
    """``mlflow models serve --env-manager local`` of ``model_uri`` on a free 127.0.0.1 port
    (one uvicorn worker), up when this yields the port; terminated on exit."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow models serve did not start") from None
                time.sleep(1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def percentiles(xs: list[float]) -> dict:
    a = np.array(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200, help="timed requests per size")
    ap.add_argument("--tower", default="dlrm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving.json")
    a = ap.parse_args()
    from deploy.export import export_model, load_program, register_export, score_table
    from jobs.config import load_config
    from model.ranking import RankingModel
    from pipeline.days import parse_days
    from pipeline.generator import generate
    from pipeline.validate import to_canonical

    cfg = load_config(ROOT / "configs/demo_world.toml", [f"model.tower={a.tower}", "generator.rows_per_day=2000",
                                                    "generator.files_per_day=1"])
    tmp = Path(tempfile.mkdtemp(prefix="tokenrec-serving-"))
    generate(cfg.schema, cfg.generator, tmp / "data", parse_days("2026-01-01"), log=lambda *_: None)
    rows = pq.read_table(next((tmp / "data").glob("day=*/*.parquet"))).drop_columns(["click", "p_true"])
    torch.manual_seed(0)
    export = export_model(RankingModel(cfg.schema, cfg.model), tmp / "export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    register_export(export, uri, "latency", NAME, tmp / "mlartifacts", alias="champion")

    results = {}
    with mlflow_serve(uri, f"models:/{NAME}@champion") as port:
        program, schema, _ = load_program(export)
        for size in (1, 256):
            bodies = [json.dumps({"dataframe_records": rows.slice((i * size) % (rows.num_rows - size), size)
                                  .to_pylist()}).encode() for i in range(20)]
            times = []
            for i in range(20 + a.requests):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=bodies[i % 20],
                                             headers={"Content-Type": "application/json"})
                t0 = time.perf_counter()
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert r.status == 200
                    r.read()
                if i >= 20:
                    times.append(time.perf_counter() - t0)
            direct = []
            torch.set_num_threads(1)
            for i in range(20 + a.requests):
                t = to_canonical(rows.slice((i * size) % (rows.num_rows - size), size), schema, with_labels=False)
                t0 = time.perf_counter()
                score_table(program, t, schema)
                if i >= 20:
                    direct.append(time.perf_counter() - t0)
            results[f"{size}_rows"] = {"http": percentiles(times), "program_in_process": percentiles(direct)}
            h, d = results[f"{size}_rows"]["http"], results[f"{size}_rows"]["program_in_process"]
            print(f"{size:>4} rows: HTTP p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms | "
                  f"program alone p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "serving", "config": "configs/demo_world.toml", "tower": a.tower, "server":
        "mlflow models serve --env-manager local (uvicorn, 1 worker), 127.0.0.1", "latency": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
