"""A warm start from a checkpoint of another tower layout (e.g. a wave-1 TokenFormer) stops on the
driver, before any worker starts, with a message naming the difference (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from embedding.schema import load_schema
from jobs.checkpoint import check_layout
from model.ranking import ModelConfig, RankingModel, RankingTrain
from model.tokenformer import TokenFormerConfig

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")
WAVE1 = TokenFormerConfig(d_model=32, target_tokens="group", event_tokens="sum")


def _checkpoint(tmp_path: Path, cfg: TokenFormerConfig) -> Path:
    torch.manual_seed(0)
    train = RankingTrain(RankingModel(SCHEMA, ModelConfig(tower="tokenformer", tokenformer=cfg)))
    dcp.save({"model": train.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"step": 1}))
    return tmp_path / "ckpt"


def _template(cfg: TokenFormerConfig) -> RankingTrain:
    with torch.device("meta"):
        return RankingTrain(RankingModel(SCHEMA, ModelConfig(tower="tokenformer", tokenformer=cfg),
                                         sparse_device=torch.device("meta")))


def test_a_wave1_checkpoint_is_refused_naming_the_layout_difference(tmp_path) -> None:
    ckpt = _checkpoint(tmp_path, WAVE1)
    check_layout(ckpt, _template(WAVE1))  # the same layout: fine
    with pytest.raises(ValueError) as e:
        check_layout(ckpt, _template(TokenFormerConfig(d_model=32)))  # today's default layout
    msg = str(e.value)
    assert "not in the checkpoint (2): tower.target_b, tower.target_w" in msg
    assert "only in the checkpoint (2): tower.target_proj.0.bias, tower.target_proj.0.weight" in msg
    assert "tower.behaviour_proj.weight: (32, 16) in the checkpoint, (32, 32) now" in msg
    assert 'target_tokens = "group", event_tokens = "sum"' in msg and "--cold-start" in msg
    wider = r"other shapes \(43\): tower.behaviour_proj.bias: \(32,\) in the checkpoint, \(64,\) now"
    with pytest.raises(ValueError, match=wider):
        check_layout(ckpt, _template(TokenFormerConfig(d_model=64, target_tokens="group", event_tokens="sum")))


def test_a_checkpoint_with_other_tables_is_refused_naming_them(tmp_path) -> None:
    """A wave-1 checkpoint kept the history on a ``hist_item`` table of its own; today's tiny
    schema shares the ``item`` table (an id-space table, looked up by the unpooled collection)."""
    import copy
    import tomllib

    from embedding.schema import FeatureSchema

    with open(ROOT / "configs/tiny.toml", "rb") as f:
        doc = tomllib.load(f)["schema"]
    old = copy.deepcopy(doc)
    old["tables"]["hist_item"] = {"hash_size": 500, "dim": 16}
    old["sequences"][0]["features"][0]["table"] = "hist_item"
    torch.manual_seed(0)
    cfg = ModelConfig(tower="tokenformer", tokenformer=WAVE1)
    train = RankingTrain(RankingModel(FeatureSchema.from_dict(old), cfg))
    dcp.save({"model": train.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError) as e:
        check_layout(tmp_path / "ckpt", _template(WAVE1))
    msg = str(e.value)
    assert "embedding tables differ" in msg and "sparse_arch.ec.embeddings.item.weight" in msg
    assert "only in the checkpoint (2): sparse_arch.ebc.embedding_bags.item.weight, " \
           "sparse_arch.ec.embeddings.hist_item.weight" in msg
