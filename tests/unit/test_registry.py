"""Registry rules on a real MLflow SQLite store (no training): which version a day warm-starts
from, and the gate refusing to compare models on a day one of them trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.config import GateConfig
from jobs.registry import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    for days in ("2026-01-01..2026-01-01", "2026-01-02..2026-01-02", "2026-01-03..2026-01-03"):
        client.create_model_version("m", source=str(tmp_path), tags={"tokenrec.days": days})
    return Registry(client, "m")


def test_parent_is_the_champion_or_latest_trained_before_the_day(reg: Registry) -> None:
    assert reg.parent_for("2026-01-04") == 3  # no champion: the newest
    reg.set_champion(2, "test")
    assert reg.parent_for("2026-01-04") == 2  # the champion
    assert reg.parent_for("2026-01-02") == 1  # rerun of day 2: the champion trained on it
    assert reg.parent_for("2026-01-01") is None  # nothing before day 1: cold start


def test_gate_refuses_a_day_a_model_trained_on(reg: Registry) -> None:
    reg.set_champion(3, "test")
    d = reg.decide(1, "/nonexistent", "2026-01-02", GateConfig(), log=lambda *_: None)
    assert not d.promote and "not comparable" in d.summary()
    assert reg.champion() == 3 and reg.alias("challenger") == 1


def test_rollback_skips_a_version_deleted_since_it_was_champion(reg: Registry) -> None:
    """Issue 19 (kind 6): champion history [1, 2, 3] with version 2 deleted: rollback goes to 1
    and says it skipped 2; with [1, 3] and 1 deleted it says in one message why it cannot."""
    for v in (1, 2, 3):
        reg.set_champion(v, "test")
    reg.client.delete_model_version("m", "2")
    said: list[str] = []
    assert reg.rollback(log=said.append) == 1
    assert reg.champion() == 1 and any("skipping deleted version(s) [2]" in s for s in said)

    reg.set_champion(3, "test")
    reg.client.delete_model_version("m", "1")
    with pytest.raises(ValueError, match=r"version 3 is the first champion of 'm' still in the registry "
                                         r"\(earlier champions \[1\] were deleted\)"):
        reg.rollback(log=lambda *_: None)


def test_the_champion_lock_is_a_unique_registered_model(reg: Registry) -> None:
    """``Registry.lock`` (no shared filesystem): held = the registered model ``m.tokenrec-lock``
    exists; a second taker waits and, past its timeout, names the holder and how to clear a
    dead one; leaving deletes it, also when the body raised; the lock never shows as a version."""
    with reg.lock():
        held = reg.client.get_registered_model("m.tokenrec-lock")
        assert "pid" in held.tags["tokenrec.lock_holder"] and held.tags["tokenrec.lock_token"]
        other = Registry(reg.client, "m")
        with pytest.raises(TimeoutError, match=r"held by .* pid .*delete the registered model 'm.tokenrec-lock'"):
            with other.lock(timeout=0.3, poll=0.05):
                pass
        assert reg.client.get_registered_model("m.tokenrec-lock").tags == held.tags, "the waiter left it alone"
    assert not reg.client.search_registered_models("name = 'm.tokenrec-lock'")
    with pytest.raises(RuntimeError, match="body"):
        with reg.lock():
            raise RuntimeError("body")
    assert not reg.client.search_registered_models("name = 'm.tokenrec-lock'")
    with reg.lock(timeout=1):  # free again at once
        assert reg.champion() is None


def test_a_lock_whose_create_reply_was_lost_is_recognised_as_ours(reg: Registry) -> None:
    """A retried create (the first one went through, its reply was lost) answers
    RESOURCE_ALREADY_EXISTS: the token in the lock's tags says it is ours, so no deadlock."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    class LostReply:
        def __init__(self, client: MlflowClient) -> None:
            self.client = client

        def __getattr__(self, name: str):
            return getattr(self.client, name)

        def create_registered_model(self, *args, **kwargs):
            self.client.create_registered_model(*args, **kwargs)
            raise MlflowException("registered model already exists", error_code=RESOURCE_ALREADY_EXISTS)

    lossy = Registry(LostReply(reg.client), "m")
    with lossy.lock(timeout=0.5, poll=0.05):
        assert reg.client.search_registered_models("name = 'm.tokenrec-lock'")
    assert not reg.client.search_registered_models("name = 'm.tokenrec-lock'")


def test_a_stale_lock_is_removed_and_release_leaves_another_holders_lock(reg: Registry) -> None:
    """A holder that died holding the lock (no release) blocks nobody past ``stale`` s; a holder
    whose lock was removed and retaken by someone else does not delete the new holder's lock."""
    import time

    name = reg.lock_name()
    reg.client.create_registered_model(name, tags={"tokenrec.lock_holder": "host pid 1", "tokenrec.lock_token": "dead",
                                                   "tokenrec.lock_since": f"{time.time() - 3600:.3f}"})
    with reg.lock(timeout=5, poll=0.05, stale=120):  # an hour old: removed, then taken
        assert reg.client.get_registered_model(name).tags["tokenrec.lock_token"] != "dead"
    assert not reg.client.search_registered_models(f"name = '{name}'")

    fresh = {"tokenrec.lock_holder": "host pid 2", "tokenrec.lock_token": "alive",
             "tokenrec.lock_since": f"{time.time():.3f}"}
    with reg.lock():
        reg.client.delete_registered_model(name)  # removed by hand while we hold it, then retaken
        reg.client.create_registered_model(name, tags=fresh)
    assert reg.client.get_registered_model(name).tags["tokenrec.lock_token"] == "alive", "not ours: left alone"
    with pytest.raises(TimeoutError):  # a fresh lock is not stale
        with reg.lock(timeout=0.2, poll=0.05, stale=120):
            pass
