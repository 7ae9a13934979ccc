"""Errors at the top: an unexpected library exception (MLflow, Ray, …) becomes one line naming it
and the log file with the traceback, exit code 1; ``--verbose`` prints the traceback too (Arrow's
errors are ``ValueError``s: one line, exit code 2, like the project's own)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

import jobs.cli as cli


def _raise(a) -> int:
    raise MlflowException("registered model 'x' is locked\nsecond line of detail")


def test_a_library_error_is_one_line_and_a_log(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli, "cmd_models", _raise)
    assert cli.main(["models", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    first, second = err.strip().splitlines()
    assert first == "tokenrec models: error (mlflow.MlflowException): registered model 'x' is locked…"
    log = Path(second.split(" is in ")[1].split(" (--verbose")[0])
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "MlflowException" in log.read_text()
    assert "Traceback" not in err


def test_verbose_prints_the_traceback(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli, "cmd_models", _raise)
    assert cli.main(["--verbose", "models", "--workdir", str(tmp_path)]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize("exc, code", [(ValueError("bad value\nmore"), 2), (KeyboardInterrupt(), 130)])
def test_expected_errors_keep_their_codes(monkeypatch, tmp_path: Path, capsys, exc, code) -> None:
    def fail(a):
        raise exc
    monkeypatch.setattr(cli, "cmd_models", fail)
    assert cli.main(["models", "--workdir", str(tmp_path)]) == code
    assert "Traceback" not in capsys.readouterr().err


def test_a_ray_error_names_its_cause_without_colour_codes(monkeypatch, tmp_path: Path, capsys) -> None:
    """Ray re-raises a worker's ValueError as a RayError that is also a ValueError: it is still a
    library error (exit 1, traceback log), reported by its cause, without ANSI colour codes."""
    import ray.exceptions

    class WorkerFailed(ray.exceptions.RayError, ValueError):
        cause = ValueError("\x1b[36mbad row\x1b[39m in part-0.parquet")

    def fail(a):
        raise WorkerFailed("ray::Scorer() (pid=1) long wrapped message")
    monkeypatch.setattr(cli, "cmd_models", fail)
    assert cli.main(["models", "--workdir", str(tmp_path)]) == 1
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith("): bad row in part-0.parquet") and "\x1b" not in first


def test_verbose_is_accepted_after_the_subcommand(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli, "cmd_models", _raise)
    assert cli.main(["models", "--workdir", str(tmp_path), "--verbose"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_model_error_stops_train_before_any_worker_or_run(tmp_path: Path, capsys) -> None:
    """Issue 19 (kind 7): a managed-collision hash_size that 3 workers do not divide was found
    inside the workers, and Ray Train restarted them twice. Now it stops on the driver — no
    MLflow run, no Ray — with the message, exit code 2."""
    import ray

    code = cli.main(["train", "--config", str(Path(__file__).resolve().parents[2] / "configs/demo.toml"),
                     "--set", "train.num_workers=3",
                     "--data", str(tmp_path / "none"), "--workdir", str(tmp_path / "w"),
                     "--days", "2026-01-01"])
    err = capsys.readouterr().err
    assert code == 2 and "hash_size must be divisible by the number of workers (3)" in err, err
    assert not ray.is_initialized() and not (tmp_path / "w" / "mlflow.db").exists()


def test_a_registry_command_prints_one_line_not_mlflow_store_set_up(tmp_path: Path, capfd) -> None:
    """`tokenrec rollback` on a new store: one line saying why (no champion), not MLflow's
    "Creating initial MLflow database tables…" INFO lines first."""
    code = cli.main(["rollback", "--workdir", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    want = "tokenrec rollback: error: model 'tokenrec-ranker' has no champion to roll back"
    assert err.strip().splitlines() == [want]
