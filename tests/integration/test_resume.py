"""Exact resume through the real job: Ray Train (2 gloo workers), Ray Data, MLflow SQLite.

Run A trains 2 epochs uninterrupted. Run B is the same job stopped after step 20 (mid second
epoch, ``[train].max_steps``); run C resumes B's checkpoint. C's final weights *and* optimizer
state are bit-identical to A's."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from jobs.config import load_config
from jobs.train import TrainRequest, run_train
from pipeline.days import parse_days
from pipeline.generator import generate

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny.toml"
SETTINGS = ["train.deterministic=true", "train.epochs=2", "train.checkpoint_every=8",
            "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    cfg = load_config(TINY)
    generate(cfg.schema, cfg.generator, root, parse_days("2026-01-01..2026-01-03"), log=lambda *_: None)
    yield root
    ray.shutdown()


def _run(data: Path, workdir: Path, extra=(), **kw) -> dict:
    cfg = load_config(TINY, SETTINGS + list(extra))
    return run_train(cfg, TrainRequest(days="2026-01-01..2026-01-02", data_root=data, workdir=workdir,
                                       register=False, **kw), log=lambda *_: None)


def _flat(ckpt: str, tmp: Path) -> dict:
    dcp_to_torch_save(ckpt, str(tmp))
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                out[f"{prefix}{k}"] = v
    walk(torch.load(tmp, weights_only=False), "")
    return out


def test_stopped_and_resumed_run_is_bit_identical(data: Path, tmp_path: Path) -> None:
    full = _run(data, tmp_path / "a")
    stopped = _run(data, tmp_path / "b", ["train.max_steps=20"])
    assert stopped["stopped_early"] == 1 and stopped["steps"] == 20
    assert full["steps"] > 20, f"the uninterrupted run has only {full['steps']} steps"
    # only the newest keep_checkpoints=2 survive, and no temporary folder is left behind
    kept = sorted(p.name for p in Path(stopped["checkpoint"]).parent.iterdir())
    assert kept == ["step-00000016", "step-00000020"], kept

    resumed = _run(data, tmp_path / "c", resume_from=stopped["checkpoint"])
    assert resumed["steps"] == full["steps"]
    assert resumed["rows_trained"] == full["rows_trained"] and resumed["samples_trained"] == full["samples_trained"]
    a, c = _flat(full["checkpoint"], tmp_path / "a.pt"), _flat(resumed["checkpoint"], tmp_path / "c.pt")
    assert a.keys() == c.keys() and any(k.endswith("momentum1") for k in a) and any("exp_avg" in k for k in a)
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    # and the run really resumed rather than restarting: B's weights differ from A's final ones
    b = _flat(stopped["checkpoint"], tmp_path / "b.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    assert full["eval_auc"] == resumed["eval_auc"]


def test_tokenformer_with_dropout_and_the_schedule_mid_warmup_resumes_bit_identically(data: Path,
                                                                                       tmp_path: Path) -> None:
    """The recipe's state is the step (in the checkpoint) and the run's planned steps: stopped at
    step 20 of a 30-step warmup, with dropout (RNG) and clipping, the resumed run ends equal —
    with the tower sharded by FSDP2 (DTensor weights and AdamW moments; the test above resumes a
    DDP tower; both passed with either mode when written)."""
    recipe = ["train.dense_parallel=fsdp", "model.tower=tokenformer", "model.tokenformer.d_model=32",
              "model.tokenformer.dropout=0.1",
              "train.sharding.dense_optimizer=adamw", "train.optim.weight_decay=0.05",
              "train.optim.warmup_steps=30", "train.optim.decay=cosine", "train.optim.clip_grad_norm=0.5"]
    full = _run(data, tmp_path / "a", recipe)
    # sharded dense weights are stored as one chunk per worker, replicated ones as one
    meta = dcp.FileSystemReader(full["checkpoint"]).read_metadata().state_dict_metadata
    tower = [v for k, v in meta.items() if k.startswith("model.model.tower.layers.") and k.endswith("weight")]
    assert tower and all(len(v.chunks) == 2 for v in tower)
    stopped = _run(data, tmp_path / "b", recipe + ["train.max_steps=20"])
    resumed = _run(data, tmp_path / "c", recipe, resume_from=stopped["checkpoint"])
    assert full["steps"] > 30 and resumed["steps"] == full["steps"]
    a, c = _flat(full["checkpoint"], tmp_path / "a.pt"), _flat(resumed["checkpoint"], tmp_path / "c.pt")
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    assert full["eval_auc"] == resumed["eval_auc"]


def test_a_warm_start_from_another_layout_stops_on_the_driver_before_any_worker(data: Path, tmp_path: Path) -> None:
    """A wave-1 TokenFormer checkpoint (one target token per item group, summed event tokens)
    given to a job with today's layout: ``run_train`` raises the layout check's ValueError itself
    — not a worker failure re-raised by Ray Train — naming the difference, and no checkpoint
    folder (the workers' first write) exists."""
    import json
    import traceback

    from model.ranking import RankingModel, RankingTrain

    tower = ["model.tower=tokenformer", "model.tokenformer.d_model=32"]
    wave1 = load_config(TINY, SETTINGS + tower + ['model.tokenformer.target_tokens="group"',
                                                  'model.tokenformer.event_tokens="sum"'])
    torch.manual_seed(0)
    dcp.save({"model": RankingTrain(RankingModel(wave1.schema, wave1.model)).state_dict()},
             checkpoint_id=str(tmp_path / "wave1"))
    (tmp_path / "wave1" / "meta.json").write_text(json.dumps({"step": 1}))

    with pytest.raises(ValueError) as err:
        _run(data, tmp_path / "w", tower, init_from=str(tmp_path / "wave1"))
    assert type(err.value) is ValueError  # Ray re-raises a worker's error as a subclass of its type
    frames = [(Path(f.filename).name, f.name) for f in traceback.extract_tb(err.value.__traceback__)]
    assert ("train.py", "_train_and_register") in frames and frames[-1] == ("checkpoint.py", "check_layout")
    msg = str(err.value)
    assert msg.startswith("--init-from") and "another layout" in msg and "tower.target_proj" in msg
    assert 'target_tokens = "group", event_tokens = "sum"' in msg
    assert not list((tmp_path / "w").rglob("checkpoints"))
