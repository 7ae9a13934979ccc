"""The package layering of ``../shared/DESIGN.md`` ("may import"), checked on the source: each
package imports only the packages below it — ``deploy/`` (serving) never imports the trainer in
``jobs/`` (issue 20 moved the checkpoint-metadata check and the MLflow connection below it),
``model/`` never imports ``torch.distributed``, Ray or MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("embedding", "model", "pipeline", "jobs", "deploy")
MAY_IMPORT = {
    "embedding": {"embedding"},
    "model": {"model", "embedding"},
    "pipeline": {"pipeline", "embedding"},
    "deploy": {"deploy", "embedding", "model", "pipeline"},
    "jobs": set(PROJECT),
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_packages_import_only_the_layers_below(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            if top in PROJECT and top not in MAY_IMPORT[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, bad


def test_model_stays_single_device() -> None:
    banned = ("torch.distributed", "torchrec.distributed", "ray", "mlflow")
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / "model").rglob("*.py"))
           for m in _imports(p) if m.startswith(banned)]
    assert not bad, bad
