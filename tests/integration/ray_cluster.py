"""A real Ray cluster of ``ray start`` processes on 127.0.0.1 for the cluster tests: a head and
any number of further nodes, each with its own ports and its own ``--temp-dir``, stopped by
temp dir (``stop``) — not ``ray stop``, which ends every Ray on the machine (a study running
beside the suite included)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(**extra: str) -> dict[str, str]:
    """This process's environment for a fresh cluster: ``RAY_ADDRESS`` dropped, the venv's
    ``bin`` first on ``PATH``, usage stats off, and token authentication with a fresh token (as
    Ray 2.60 sets a head up by default)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)} | extra


def temp_dir() -> str:
    """A fresh Ray temp folder under /tmp: short, since Ray's socket paths must fit 107 bytes."""
    return tempfile.mkdtemp(prefix="tr-ray-", dir="/tmp")


def start(env: dict[str, str], temp: str, num_cpus: int, head_address: str | None = None,
          resources: dict[str, float] | None = None) -> tuple[str, int | None]:
    """``ray start`` a head (``head_address`` None) or a node joining ``head_address``
    (``127.0.0.1:<gcs port>``), every port its own. Returns (GCS address, dashboard port; None
    for a node). Raises ``AssertionError`` with Ray's output when it does not start."""
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port")]
    args = [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            "--disable-usage-stats", f"--temp-dir={temp}", *own_ports]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    dashboard = None
    if head_address is None:
        gcs, dashboard = f"127.0.0.1:{free_port()}", free_port()
        args += ["--head", f"--port={gcs.rsplit(':', 1)[1]}", f"--dashboard-port={dashboard}",
                 "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={free_port()}"]
    else:
        gcs = head_address
        args.append(f"--address={gcs}")
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return gcs, dashboard


def processes_of(temp: str) -> list[int]:
    """The processes of the Ray node started with ``--temp-dir temp``: those whose command line
    names it (GCS, raylet, dashboard, …) and all their descendants (workers, whose process titles
    Ray rewrites), read from /proc."""
    parent, roots = {}, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if temp in cmdline and int(entry.name) != os.getpid():
            roots.append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child, ppid in parent.items() if ppid == pid]
    return sorted(found)


def stop(temp: str) -> None:
    """Stop the node of ``temp`` only: SIGTERM, then SIGKILL what is left after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_of(temp)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 20
        while pids and time.time() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.5)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
