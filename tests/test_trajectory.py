"""Trajectory modules: identity at init, t-routing, rank schedules, regularisers, no graph below."""

import pytest
import torch

from lora_diffusion.core import config as config_lib
from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods import Context, build_method
from lora_diffusion.core.methods.trajectory import TrajectoryConfig, nuclear_norm_lowrank, orthogonality, rank_schedule
from lora_diffusion.core.recipe import Recipe


def _setup(tiny_backbone_dir, **sets):
    sets = {"trajectory.injection_layers": [1], **sets}  # the tiny model has 2 layers
    config = config_lib.from_dict({}, {"backbone": str(tiny_backbone_dir), **sets})
    torch.manual_seed(0)
    backbone = load_backbone(config.backbone)
    backbone.model.eval()
    return config, backbone, build_method(config, backbone)


def _inputs(backbone, B=4, S=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (B, S), generator=g)
    ids[:, 5] = backbone.mask_token_id
    attn = torch.ones_like(ids)
    select = ids == backbone.mask_token_id
    return ids, attn, select


@pytest.mark.parametrize("sharing", ["per_phase", "shared", "per_step"])
@pytest.mark.parametrize("layers", [[0], [-1], [0, 1]])
def test_untrained_module_leaves_logits_bit_identical(tiny_backbone_dir, sharing, layers):
    config, backbone, method = _setup(tiny_backbone_dir, **{"trajectory.sharing": sharing,
                                                            "trajectory.injection_layers": layers,
                                                            "trajectory.num_tasks": 2})
    ids, attn, select = _inputs(backbone)
    base = backbone.logits(ids, attn, select)  # no context: hooks are pass-through
    method.set_context(Context(t=torch.tensor([0.1, 0.4, 0.6, 0.95]), task_ids=torch.tensor([0, 1, 0, 1])))
    with_module = backbone.logits(ids, attn, select)
    assert torch.equal(base, with_module)


def test_phase_selects_its_own_module(tiny_backbone_dir):
    config, backbone, method = _setup(tiny_backbone_dir, **{"trajectory.num_phases": 4})
    layer = method.injection["layer1"]
    with torch.no_grad():
        layer.phases["phase3"].B.normal_()  # only the highest-noise phase is non-zero
    ids, attn, select = _inputs(backbone)
    method.set_context(None)
    base = backbone.logits(ids, attn, select)
    method.set_context(Context(t=torch.tensor([0.1, 0.3, 0.6, 0.9])))
    out = backbone.logits(ids, attn, select)
    changed = ~torch.isclose(out, base).all(-1)
    assert changed.tolist() == [False, False, False, True]


def test_phase_boundaries_are_half_open_on_the_left(tiny_backbone_dir):
    _, _, method = _setup(tiny_backbone_dir, **{"trajectory.phase_boundaries": [0.0, 0.25, 1.0]})
    assert method.phase_of(torch.tensor([0.001, 0.25, 0.2501, 1.0])).tolist() == [0, 0, 1, 1]


def test_rank_schedules_and_reversed_direction():
    tc = TrajectoryConfig(rank=8, min_rank=2)
    edges = [0, 0.25, 0.5, 0.75, 1.0]
    get = lambda name: rank_schedule(TrajectoryConfig(rank=8, min_rank=2, rank_schedule=name), edges)
    assert get("constant") == [8, 8, 8, 8]
    assert get("linear") == [2, 4, 6, 8]  # paper: more rank at high noise (high t)
    assert get("reversed") == [8, 6, 4, 2]  # T-LoRA: less rank at high noise
    assert get("step") == [2, 2, 8, 8]
    cos = get("cosine")
    assert cos[0] == 2 and cos[-1] == 8 and cos == sorted(cos)
    assert tc.rank_schedule == "constant"


def test_module_count_equals_phases_that_own_a_module(tiny_backbone_dir):
    _, _, method = _setup(tiny_backbone_dir, **{"trajectory.rank_schedule": "step", "trajectory.min_rank": 0,
                                                "trajectory.num_phases": 4})
    layer = next(iter(method.injection.values()))
    assert sorted(layer.phases) == ["phase2", "phase3"]


def test_shared_mode_masks_rank_by_t(tiny_backbone_dir):
    _, backbone, method = _setup(tiny_backbone_dir, **{"trajectory.sharing": "shared",
                                                       "trajectory.rank_schedule": "linear",
                                                       "trajectory.min_rank": 1, "trajectory.rank": 4,
                                                       "trajectory.num_phases": 4})
    layer = next(iter(method.injection.values()))
    with torch.no_grad():
        layer.module.B.normal_()
    h = torch.randn(2, 8, backbone.hidden_size)
    phase = torch.tensor([0, 3])
    delta = layer.delta(h, phase, None)
    # phase 0 has rank 1: the delta lies in the span of the first column of B
    b0 = layer.module.B[:, :1]
    proj = b0 @ torch.linalg.pinv(b0) @ delta[0].T
    assert torch.allclose(proj, delta[0].T, atol=1e-5)
    assert torch.linalg.matrix_rank(delta[1]) == 4


def test_nuclear_norm_matches_brute_force_svd():
    g = torch.Generator().manual_seed(0)
    for d, r in [(16, 3), (10, 10), (32, 1)]:
        B, A = torch.randn(d, r, generator=g), torch.randn(r, d, generator=g)
        brute = torch.linalg.svdvals(B @ A).sum()
        assert torch.allclose(nuclear_norm_lowrank(B, A), brute, rtol=1e-4)


def test_orthogonality_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 12, generator=g)
    brute = sum(((A[i] @ A[j]) - (1.0 if i == j else 0.0)) ** 2 for i in range(4) for j in range(4))
    assert torch.allclose(orthogonality(A), brute, rtol=1e-5)
    q, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    assert orthogonality(q.T) < 1e-10


def test_regularizers_are_logged_and_weighted(tiny_backbone_dir):
    _, _, method = _setup(tiny_backbone_dir, **{"trajectory.nuclear_weight": 0.5, "trajectory.orth_weight": 0.25})
    total, logs = method.regularization()
    assert set(logs) == {"reg_nuclear", "reg_orth"}
    assert logs["reg_nuclear"] == 0.0  # B = 0 at init
    assert torch.isclose(total, torch.tensor(0.25 * logs["reg_orth"]))
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.trainable().values() if p.grad is not None)


def test_frozen_backbone_builds_no_graph_below_the_injection(tiny_backbone_dir):
    _, backbone, method = _setup(tiny_backbone_dir, **{"trajectory.injection_layers": [-1]})
    seen = {}
    last = backbone.layers[-1]
    handle = last.register_forward_hook(lambda m, i, o: seen.setdefault(
        "grad_fn", (o[0] if isinstance(o, tuple) else o).grad_fn), prepend=True)
    ids, attn, select = _inputs(backbone)
    method.set_context(Context(t=torch.full((4,), 0.5)))
    out = backbone.logits(ids, attn, select)
    handle.remove()
    assert seen["grad_fn"] is None  # nothing below the module is recorded for backward
    assert out.requires_grad  # the module itself is


def test_trainable_parameters_are_only_the_modules(tiny_backbone_dir):
    _, backbone, method = _setup(tiny_backbone_dir)
    names = list(method.trainable())
    assert names and all(n.startswith("injection.") for n in names)
    assert not any(p.requires_grad for p in backbone.model.parameters())


@pytest.mark.parametrize("sharing", ["per_phase", "shared"])
def test_task_conditioning_gives_each_task_id_its_own_output(tiny_backbone_dir, sharing):
    _, backbone, method = _setup(tiny_backbone_dir, **{"trajectory.num_tasks": 2,
                                                       "trajectory.sharing": sharing})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for training: non-zero B, task gains apart
        for p in method.trainable().values():
            p.add_(torch.randn(p.shape, generator=g))
    ids, attn, select = _inputs(backbone, B=1)
    ids, attn, select = ids.repeat(2, 1), attn.repeat(2, 1), select.repeat(2, 1)
    method.set_context(Context(t=torch.tensor([0.5, 0.5]), task_ids=torch.tensor([0, 1])))
    out = backbone.logits(ids, attn, select).view(2, -1)
    assert not torch.allclose(out[0], out[1])
    method.set_context(Context(t=torch.tensor([0.5, 0.5])))  # no ids: refused, not guessed
    with pytest.raises(ValueError, match="task_ids"):
        backbone.logits(ids, attn, select)


@pytest.mark.parametrize("sets", [{"trajectory.task_id": 2, "trajectory.num_tasks": 2},
                                  {"trajectory.task_id": -1}])
def test_task_id_outside_the_conditioned_tasks_names_the_field(sets):
    with pytest.raises(UserError, match="field trajectory.task_id:"):
        config_lib.from_dict({}, sets)


def test_recipe_passes_the_runs_task_id_in_training_evaluation_and_sampling(tiny_config):
    recipe = Recipe(tiny_config(**{"trajectory.num_tasks": 2, "trajectory.task_id": 1, "train.lr": 0.05}))
    seen = []
    set_context = recipe.method.set_context
    recipe.method.set_context = lambda c: (seen.append(c) if c is not None else None, set_context(c))
    gains = {n: p.detach().clone() for n, p in recipe.method.trainable().items() if "task_gain" in n}
    for _ in range(2):  # B = 0 at the first step: the gains get gradient from the second
        recipe.train_step()
    recipe.evaluate(recipe.validation_examples[:4], "validation", sampler=True)
    assert seen and all(c.task_ids is not None and c.task_ids.eq(1).all() for c in seen)
    after = {n: p.detach() for n, p in recipe.method.trainable().items() if "task_gain" in n}
    assert all(torch.equal(after[n][0], gains[n][0]) for n in gains)  # task 0 never trained
    assert any(not torch.equal(after[n][1], gains[n][1]) for n in gains)
