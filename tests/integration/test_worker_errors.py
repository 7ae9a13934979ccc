"""Issue 19 (kind 7): an exception that would recur (a ``ValueError`` raised in the workers)
ends the Ray Train run on its first attempt, with the worker's message; Ray Train's failure
policy (``max_failures``) alone would restart the worker group for it. Worker deaths are still
retried: ``tests/integration/test_faults.py`` kills a worker under the same callback."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.train import DeterministicWorkerError, StopOnDeterministicError, _find, init_ray


def test_a_value_error_in_a_worker_is_not_retried(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts"
    attempts.write_text("")

    def loop(config):
        with open(config["attempts"], "a") as f:
            f.write("attempt\n")
        raise ValueError("managed-collision tables ['item']: hash_size must be divisible (simulated)")

    init_ray(None, 1)
    trainer = TorchTrainer(loop, train_loop_config={"attempts": str(attempts)},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="deterministic", storage_path=str(tmp_path / "ray"),
                                                failure_config=FailureConfig(max_failures=2),
                                                callbacks=[StopOnDeterministicError()]))
    with pytest.raises(Exception) as info:
        trainer.fit()
    stop = _find(info.value, DeterministicWorkerError)
    assert stop is not None and "worker 0: ValueError: managed-collision tables ['item']" in str(stop)
    assert attempts.read_text().count("attempt") == 1  # max_failures=2 would have made it 3


def test_the_callback_leaves_lost_workers_to_the_failure_policy() -> None:
    import ray.exceptions

    callback = StopOnDeterministicError()
    callback.after_exception(None, {0: ray.exceptions.RayActorError(), 1: RuntimeError("gloo: connection reset")})
    with pytest.raises(DeterministicWorkerError, match=r"worker 1: KeyError: 'hist_item_id'"):
        callback.after_exception(None, {0: RuntimeError("peer closed"), 1: KeyError("hist_item_id")})


def test_an_error_in_the_data_pipeline_is_found_under_ray_datas_wrapper() -> None:
    """Ray Data wraps a reader/quarantine-step error as ``UserCodeException(...) from e``: the
    cause is followed, so a bad-input error raised there is not retried either; a lost worker
    on another rank defers to the failure policy (its errors may be knock-on effects)."""
    import pyarrow as pa
    import ray.exceptions

    wrapped = ray.exceptions.UserCodeException("UDF failed to process a data block.")
    wrapped.__cause__ = pa.ArrowInvalid("Integer value 9223372036854775809 not in range")
    with pytest.raises(DeterministicWorkerError, match=r"worker 0: ArrowInvalid: Integer value"):
        StopOnDeterministicError().after_exception(None, {0: wrapped})
    StopOnDeterministicError().after_exception(None, {0: ValueError("knock-on"), 1: ray.exceptions.RayActorError()})
