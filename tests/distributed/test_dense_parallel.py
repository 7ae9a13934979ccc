"""FSDP2-sharded dense tower (``[train].dense_parallel = "fsdp"``) equals the unsharded model and
DDP: outputs, every dense parameter's gradient (averaged over workers — a reduction that sums
instead, pytorch#162338, fails here) and the parameters after one clipped AdamW step. Tables are
row-wise sharded with their fused optimizer. Real gloo processes: 2, and 4 for TokenFormer."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed._composable import _get_registry
from torch.distributed.tensor import DTensor
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embedding.dense_parallel import DenseParallelConfig, fsdp_modules, tower_blocks
from embedding.schema import load_schema
from embedding.sharding import ShardingConfig, apply_sparse_optimizer, dense_optimizer, shard
from jobs.optim import clip, decays
from jobs.worker import strip_prefixes
from model.ranking import ModelConfig, RankingModel, RankingTrain
from model.tokenformer import TokenFormerConfig
from pipeline.collate import collate
from tests.distributed.harness import copy_into_sharded, full, one_day_file, run_multiprocess

ROOT = Path(__file__).resolve().parents[2]
BATCH = 16
LR, WD, MAX_NORM = 1e-2, 0.05, 0.05  # the clip is active: the gradient norm is ~0.1–1


def _cfg(tower: str) -> ModelConfig:
    return ModelConfig(tower=tower, tokenformer=TokenFormerConfig(windows=(8, 4), dropout=0.0))


def _check(rank: int, world: int, tower: str, mode: str, ac: bool, data_file: str) -> None:
    schema = load_schema(ROOT / "configs/tiny.toml")
    table = pq.read_table(data_file).slice(0, BATCH * world)
    global_batch = collate(table, schema)
    local_batch = collate(table.slice(rank * BATCH, BATCH), schema)
    cfg = ShardingConfig(sharding_types=("row_wise",), sparse_optimizer="sgd", sparse_lr=LR,
                         dense_optimizer="adamw", dense_lr=LR)
    torch.manual_seed(0)
    ref = RankingTrain(RankingModel(schema, _cfg(tower)))
    dmp = shard(RankingTrain(RankingModel(schema, _cfg(tower), sparse_device=torch.device("meta"),
                                          num_shards=world)),
                cfg, torch.device("cpu"), dense=DenseParallelConfig(dense_parallel=mode, activation_checkpointing=ac))
    blocks = tower_blocks(dmp)
    assert all(("checkpoint" in (_get_registry(b) or {})) == ac for b in blocks), "activation checkpointing"
    if mode == "fsdp":
        groups = fsdp_modules(dmp)
        assert len(groups) == 1 + len(tower_blocks(dmp)), "blocks and root each one FSDP2 group"
        assert tower != "tokenformer" or len(groups) > 2
    state = dmp.state_dict()
    copy_into_sharded(state, {f"_dmp_wrapped_module.{k}" if f"_dmp_wrapped_module.{k}" in state else k: v
                              for k, v in ref.state_dict().items()} | ref.state_dict())
    dmp.load_state_dict(state)
    apply_sparse_optimizer(ref, cfg)
    ref_params = dict(in_backward_optimizer_filter(ref.named_parameters()))
    ref_opt = torch.optim.AdamW(
        [{"params": [p for n, p in ref_params.items() if decays(n, p)], "weight_decay": WD},
         {"params": [p for n, p in ref_params.items() if not decays(n, p)], "weight_decay": 0.0}], lr=LR)
    opt = dense_optimizer(dmp, cfg, WD, decays)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    assert dense and all(isinstance(p, DTensor) == (mode == "fsdp") for p in dense.values())

    loss, out = dmp(local_batch)
    ref_loss, ref_out = ref(global_batch)
    torch.testing.assert_close(out, ref_out[rank * BATCH:(rank + 1) * BATCH], atol=1e-5, rtol=1e-5)
    opt.zero_grad()
    loss.backward()
    # the reference: the global batch's mean loss. Sharded, every gradient is the workers'
    # mean: the dense ones by DDP's all-reduce or FSDP2's reduce-scatter, the tables' by TorchRec
    # (its gradient division by the world size), so the fused table update matches too
    ref_loss.backward()
    norm = clip([p for p in dense.values()], MAX_NORM)
    ref_norm = clip([p for p in ref_params.values()], MAX_NORM)
    torch.testing.assert_close(full(norm), ref_norm, atol=1e-5, rtol=1e-4)
    assert ref_norm > MAX_NORM, "the clip should be active in this test"
    checked = 0
    for name, p in dense.items():
        rp = ref_params[strip_prefixes(name)]
        if rp.grad is None:
            assert p.grad is None or not full(p.grad).any(), f"{name}: gradient on the sharded side only"
            continue
        assert p.grad is not None, f"{name}: no gradient on the sharded side"
        torch.testing.assert_close(full(p.grad), rp.grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked >= 8, f"only {checked} dense parameters had gradients"
    opt.step()
    ref_opt.step()
    for name, p in dense.items():
        # Adam's first step is ~ lr · sign(g): where |g| is at float noise (1e-9) the step can
        # differ by a share of lr, so the tolerance is 1% of lr (the gradients are checked above)
        torch.testing.assert_close(full(p.detach()), ref_params[strip_prefixes(name)].detach(),
                                   atol=LR * 1e-2, rtol=1e-4, msg=lambda m, name=name: f"{name} after the step: {m}")
    with torch.no_grad():
        after = dmp(local_batch)[1]
        ref_after = ref(global_batch)[1][rank * BATCH:(rank + 1) * BATCH]
    assert not torch.allclose(after, out, atol=1e-3), "the step changed nothing"
    torch.testing.assert_close(after, ref_after, atol=1e-4, rtol=1e-4)  # Adam: see the tolerance above
    # evaluation: the same local rows on both sides (rows of one request are scored together,
    # through code that reads the blocks' weights without calling them), then training again
    for _ in range(2):
        dmp.eval()
        ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(dmp(local_batch)[1], ref(local_batch)[1], atol=1e-4, rtol=1e-4)
        dmp.train()
        ref.train()
        with torch.no_grad():
            torch.testing.assert_close(dmp(local_batch)[1], after, atol=1e-6, rtol=1e-6)
        if mode == "fsdp":  # back in training, every block holds only its shard again
            assert all(isinstance(p, DTensor) for b in tower_blocks(dmp) for p in b.parameters())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return one_day_file(tmp_path_factory.mktemp("logs"), load_schema(ROOT / "configs/tiny.toml"), BATCH * 4, seed=3,
                        candidates_per_request=4)  # evaluation scores requests together


@pytest.mark.parametrize("tower,mode,ac,world", [
    ("tokenformer", "fsdp", False, 2), ("dlrm", "fsdp", False, 2),
    ("tokenformer", "fsdp", True, 2), ("tokenformer", "ddp", True, 2), ("tokenformer", "fsdp", False, 4)])
def test_dense_parallel_equals_unsharded(tower: str, mode: str, ac: bool, world: int, data_file: str) -> None:
    """``ac``: activation checkpointing per block (recomputed activations, the same gradients)."""
    run_multiprocess(_check, world, tower, mode, ac, data_file)


def _check_bf16(rank: int, world: int, data_file: str) -> None:
    schema = load_schema(ROOT / "configs/tiny.toml")
    local_batch = collate(pq.read_table(data_file).slice(rank * BATCH, BATCH), schema)
    torch.manual_seed(0)
    ref = RankingTrain(RankingModel(schema, _cfg("tokenformer")))
    dmp = shard(RankingTrain(RankingModel(schema, _cfg("tokenformer"), sparse_device=torch.device("meta"),
                                          num_shards=world)),
                ShardingConfig(sharding_types=("row_wise",)), torch.device("cpu"),
                dense=DenseParallelConfig(dense_parallel="fsdp", mixed_precision="bf16"))
    state = dmp.state_dict()
    copy_into_sharded(state, {f"_dmp_wrapped_module.{k}": v for k, v in ref.state_dict().items()} | ref.state_dict())
    dmp.load_state_dict(state)
    # evaluation scores the rows of a request together, reading the blocks' (bf16) weights directly
    dmp.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(dmp(local_batch)[1], ref(local_batch)[1], atol=0.05, rtol=0.05)
    dmp.train()
    ref.train()
    seen = []  # the dtype each block computes with, and the head's
    for b in tower_blocks(dmp):
        b.register_forward_pre_hook(lambda m, _: seen.append(next(iter(m.parameters())).dtype))
    head = dmp.module.model.tower.head
    head.register_forward_pre_hook(lambda m, _: seen.append(("head", m.weight.dtype)))
    loss, out = dmp(local_batch)
    loss.backward()
    assert set(seen) == {torch.bfloat16, ("head", torch.float32)}, seen
    ref_out = ref(local_batch)[1]
    assert out.dtype == torch.float32 and not torch.equal(out, ref_out), "bf16 blocks should round"
    torch.testing.assert_close(out, ref_out, atol=0.05, rtol=0.05)  # bfloat16: 8 bits of mantissa
    weights = [p for p in dmp.parameters() if isinstance(p, DTensor)]
    assert weights and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in weights)



def test_bf16_blocks_keep_fp32_weights_and_gradients(data_file: str) -> None:
    """``mixed_precision = "bf16"`` (meant for GPUs; the mechanism runs on gloo too): the blocks
    compute in bfloat16, outputs and the sharded weights and gradients stay float32."""
    run_multiprocess(_check_bf16, 2, data_file)
