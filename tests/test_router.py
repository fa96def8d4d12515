"""Router composition: frozen trained experts, only the router trains, weights from the prompt."""

import json

import pytest
import torch

from lora_diffusion.core import checkpoint
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods.trajectory import LowRank
from lora_diffusion.core.recipe import Recipe


def _expert(tiny_config, tmp_path, name, seed, **sets):
    config = tiny_config(**{"train.seed": seed, "train.steps": 2, "train.lr": 0.05, **sets})
    recipe = Recipe(config)
    for _ in range(2):
        recipe.train_step()
    return checkpoint.save(tmp_path / name, recipe.method, config, recipe.fingerprint, recipe.backbone.source)


def test_router_trains_only_the_router_and_mixes_frozen_experts(tiny_config, tmp_path):
    paths = [str(_expert(tiny_config, tmp_path, f"e{i}", seed=i)) for i in range(2)]
    recipe = Recipe(tiny_config(method="router", **{"router.checkpoints": paths, "train.lr": 0.1}))
    method = recipe.method
    assert set(method.trainable()) == {"router.weight", "router.bias"}
    experts_before = {n: p.clone() for n, p in method.experts.named_parameters()}
    batch = recipe.encode(recipe.train_batch(0))
    t = torch.full((batch.input_ids.shape[0],), 0.5)
    recipe.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, t)
    assert torch.allclose(method._weights, torch.full_like(method._weights, 0.5))  # uniform at init

    recipe.train_step()
    recipe.train_step()
    assert all(torch.equal(p, experts_before[n]) for n, p in method.experts.named_parameters())
    assert method.router.weight.abs().sum() > 0
    recipe.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, t)
    w = method._weights
    assert torch.allclose(w.sum(1), torch.ones(len(w)))
    assert not torch.allclose(w[0], w[1:].mean(0), atol=1e-7) or w.shape[0] == 1  # depends on the prompt


def test_router_rejects_a_single_checkpoint(tiny_config, tmp_path, capsys):
    from lora_diffusion.cli import main

    path = _expert(tiny_config, tmp_path, "only", seed=0)
    code = main(["train", "--output-dir", str(tmp_path / "out"), "--set", "method=router",
                 "--set", f"router.checkpoints=[{path}]", "--set", f"backbone={tiny_config().backbone}",
                 "--set", f"data_dir={tiny_config().data_dir}", "--set", "max_train_examples=16"])
    assert code == 2 and "router.checkpoints" in capsys.readouterr().err


def test_router_refuses_an_expert_trained_on_another_backbone(tiny_config, tmp_path):
    paths = [_expert(tiny_config, tmp_path, f"e{i}", seed=i) for i in range(2)]
    meta_file = paths[1] / "backbone.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "backbone_fingerprint": "0123456789abcdef"}))
    with pytest.raises(UserError, match=f"field router.checkpoints: {paths[1]} was trained on "
                                        "another backbone") as err:
        Recipe(tiny_config(method="router", **{"router.checkpoints": [str(p) for p in paths]}))
    assert "\n" not in str(err.value)


def test_router_runs_each_conditioned_expert_with_its_own_task_id(tiny_config, tmp_path, monkeypatch):
    paths = [str(_expert(tiny_config, tmp_path, f"e{c}", seed=c, **{"trajectory.num_tasks": 2,
                                                                      "trajectory.task_id": c}))
             for c in range(2)]
    recipe = Recipe(tiny_config(method="router", **{"router.checkpoints": paths}))
    seen = []
    down = LowRank.down
    monkeypatch.setattr(LowRank, "down", lambda self, h, ids: (seen.append(ids), down(self, h, ids))[1])
    batch = recipe.encode(recipe.train_batch(0))
    t = torch.full((batch.input_ids.shape[0],), 0.5)
    recipe.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, t)
    assert len(seen) == 2 and [ids.unique().tolist() for ids in seen] == [[0], [1]]


def test_router_parameters_all_get_gradient(tiny_config, tmp_path):
    """The router's row of the registry-wide gradient coverage (test_methods_matrix.py)."""
    paths = [str(_expert(tiny_config, tmp_path, f"e{i}", seed=i)) for i in range(2)]
    recipe = Recipe(tiny_config(method="router", **{"router.checkpoints": paths}))
    touched = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in recipe.method.trainable().items()}
    for _ in range(3):
        recipe.train_step()
        for n, p in recipe.method.trainable().items():
            touched[n] |= p.grad != 0
    assert all(hit.all() for hit in touched.values()), {n: int((~h).sum()) for n, h in touched.items()}
