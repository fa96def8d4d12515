"""Several ranks on one trial (core/sharding.py), on CPU with gloo, two processes: FSDP2-sharded
full fine-tuning and the data-parallel adapter path give the loss one rank gives on the same
global batch; a sharded recipe saved by torch.distributed.checkpoint resumes exactly; the
data-parallel path averages all gradients in one collective."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_diffusion.core import config as config_lib, sharding

STEPS = 3
GLOBAL_BATCH, LENGTH = 4, 16


def _spawn(fn, world: int, tmp: Path, *args) -> list[dict]:
    """Run fn(rank, world, tmp, *args) on `world` gloo ranks; each rank's JSON result."""
    init = tmp / f"pg-{fn.__name__}-{world}"
    mp.start_processes(_entry, args=(fn, world, init, tmp, args), nprocs=world, start_method="spawn", join=True)
    return [json.loads((tmp / f"{fn.__name__}-{world}-{r}.json").read_text()) for r in range(world)]


def _entry(rank, fn, world, init, tmp, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        out = fn(rank, world, tmp, *args)
        (tmp / f"{fn.__name__}-{world}-{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _losses_on_one_global_batch(rank, world, tmp, backbone_dir, method_name, shard):
    """STEPS AdamW steps on a fixed global batch split by rank; every position counted, the same
    number per rank, so the mean of the ranks' losses is the one-rank loss."""
    from lora_diffusion.core.backbone import load_backbone
    from lora_diffusion.core.methods import build_method

    torch.manual_seed(0)
    backbone = load_backbone(backbone_dir)
    config = config_lib.from_dict({}, {"backbone": backbone_dir, "method": method_name})
    method = build_method(config, backbone).eval()  # no dropout: ranks and runs comparable
    if shard and world > 1:
        sharding.shard_backbone(backbone)
    params = list(method.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(1000, 2000, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    mine = ids[rank::world]
    select = torch.ones_like(mine, dtype=torch.bool)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        logits = backbone.logits(mine, torch.ones_like(mine), select)
        loss = torch.nn.functional.cross_entropy(logits.float(), mine.reshape(-1))
        loss.backward()
        sharding.average_gradients(params, world)
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return {"losses": losses, "sharded": any(sharding.is_dtensor(p) for p in params)}


@pytest.mark.parametrize("method_name, shard", [("full", True), ("lora", False), ("lora", True)],
                         ids=["full-fsdp2", "lora-data-parallel", "lora-on-an-fsdp2-backbone"])
def test_two_ranks_give_the_one_rank_loss_on_the_same_global_batch(method_name, shard, tiny_backbone_dir, tmp_path):
    """lora-on-an-fsdp2-backbone: the frozen backbone sharded (one too large for a device)."""
    one = _spawn(_losses_on_one_global_batch, 1, tmp_path, str(tiny_backbone_dir), method_name, False)[0]
    two = _spawn(_losses_on_one_global_batch, 2, tmp_path, str(tiny_backbone_dir), method_name, shard)
    assert two[0]["sharded"] == shard
    assert two[0]["losses"] == two[1]["losses"]
    assert one["losses"][-1] < one["losses"][0]  # it trains
    assert two[0]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)


def _resume(rank, world, tmp, config_dict):
    """A sharded full fine-tuning recipe: 2 steps, a sharded checkpoint, 2 more steps; a fresh
    recipe loads the checkpoint and takes the same 2 steps."""
    from lora_diffusion.core import checkpoint
    from lora_diffusion.core.recipe import Recipe

    config = config_lib.from_dict(config_dict)
    first = Recipe(config, rank=rank, world_size=world)
    for _ in range(2):
        first.train_step()
    checkpoint.save_state(tmp / "ckpt", first)
    straight = [first.train_step()["train/loss"] for _ in range(2)]
    second = Recipe(config, rank=rank, world_size=world)
    checkpoint.load_state(tmp / "ckpt", second)
    resumed_step = second.step
    resumed = [second.train_step()["train/loss"] for _ in range(2)]
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(first.params, second.params, strict=True))
    result = second.final_result(0.0)  # evaluation and accounting run on the sharded model
    return {"sharded": first.sharded, "straight": straight, "resumed": resumed, "step": resumed_step,
            "same_params": same, "files": sorted(os.listdir(tmp / "ckpt")),
            "trained": result["accounting"]["trained_params"], "backbone": second.backbone.parameter_count(),
            "accuracy": result["validation/accuracy"]}


def test_a_sharded_full_fine_tuning_checkpoint_resumes_exactly(tiny_config, tmp_path):
    config = tiny_config(method="full", **{"train.lr": 1e-3, "train.steps": 8})
    results = _spawn(_resume, 2, tmp_path, config.to_dict())
    for r in results:
        assert r["sharded"] and r["step"] == 2
        assert r["resumed"] == r["straight"]  # bit for bit
        assert r["same_params"]
        assert r["trained"] == r["backbone"]  # counted whole, not one rank's shard
        assert 0 <= r["accuracy"] <= 1
    assert results[0]["accuracy"] == results[1]["accuracy"]
    files = results[0]["files"]
    assert sharding.DCP_METADATA in files and {"__0_0.distcp", "__1_0.distcp"} <= set(files)
    assert "trainer_state.json" in files


class _CountingAllReduce:
    def __init__(self):
        self.calls = 0

    def __call__(self, tensor, *args, **kwargs):
        self.calls += 1


def test_data_parallel_gradients_travel_in_one_collective_and_unused_modules_send_zeros(monkeypatch):
    counter = _CountingAllReduce()
    monkeypatch.setattr(dist, "all_reduce", counter)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    from lora_diffusion.core.recipe import Recipe

    params = [torch.nn.Parameter(torch.ones(3, 2)) for _ in range(5)]
    for p in params[:4]:
        p.grad = torch.full_like(p, 4.0)  # the 5th: a phase module no t of the batch reached
    recipe = Recipe.__new__(Recipe)  # the recipe's gradient step alone, on rank 0 of 2
    recipe.params, recipe.world_size, recipe.rank = params, 2, 0
    recipe._sync_gradients()
    assert counter.calls == 1  # was one all_reduce per parameter
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params[:4])  # summed by no one: /2
    assert torch.equal(params[4].grad, torch.zeros_like(params[4]))
