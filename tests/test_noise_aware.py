"""The noise-aware methods, NaRA (weight LoRA with an r x r core C(t) from a hypernetwork of t) and
the continuous-t trajectory module (one module, per-rank gates g(t)): zero update at
initialisation; an update that follows t, and stops following it when the hypernetwork's t input
is frozen; NaRA's hook equal to the merged weight W + (alpha / r) B C(t) A; saved and reloaded
exactly; the hypernetwork counted; bf16 backbones with fp32 parameters, with and without
autocast; NaRA's per-step cache; the conflicting settings refused; the comparison and grid rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_diffusion.core import checkpoint, config as config_lib
from lora_diffusion.core.accounting import account
from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods import Context, build_method
from lora_diffusion.core.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
NOISE_AWARE = {  # case -> (method, settings)
    "nara": ("nara", {"nara.rank": 4}),
    "nara_per_layer": ("nara", {"nara.rank": 4, "nara.layer_embedding": True}),
    "trajectory_continuous": ("trajectory_continuous", {"trajectory.rank": 4}),
    "trajectory_t_continuous": ("trajectory", {"trajectory.rank": 4, "trajectory.t_conditioning": "continuous",
                                               "trajectory.num_phases": 1}),
}
TIMES = torch.tensor([0.05, 0.3, 0.7, 1.0])


def _hypernet(method):
    return method.core if method.name == "nara" else method.t_core


def _build(tiny_backbone_dir, case, dtype=torch.float32, **extra):
    name, sets = NOISE_AWARE[case]
    config = config_lib.from_dict({}, {"backbone": str(tiny_backbone_dir), "method": name,
                                       "trajectory.injection_layers": [0], **sets, **extra})
    torch.manual_seed(0)
    backbone = load_backbone(config.backbone)
    backbone.model.to(dtype).eval()
    return build_method(config, backbone).eval(), backbone


def _inputs(backbone, rows=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (1, 10), generator=g).repeat(rows, 1)  # the same row at every t
    ids[:, 4:7] = backbone.mask_token_id
    return ids, torch.ones_like(ids), ids == backbone.mask_token_id


def _logits(method, backbone, t):
    ids, attn, select = _inputs(backbone, len(t))
    method.set_context(Context(t=t))
    try:
        return backbone.logits(ids, attn, select).view(len(t), -1)
    finally:
        method.set_context(None)


def _trained_like(method, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", sorted(NOISE_AWARE))
def test_zero_update_at_initialisation(tiny_backbone_dir, case):
    method, backbone = _build(tiny_backbone_dir, case)
    with torch.no_grad():
        on = _logits(method, backbone, TIMES)
        method.remove()
        bare = _logits(method, backbone, TIMES)
        core = _hypernet(method)(TIMES)  # the identity core / unit gates at every t
    assert torch.equal(on, bare)
    expected = torch.ones_like(core) if _hypernet(method).diagonal else torch.eye(core.shape[-1]).expand_as(core)
    assert torch.equal(core, expected)


@pytest.mark.parametrize("case", sorted(NOISE_AWARE))
def test_update_follows_t_and_stops_when_the_t_input_is_frozen(tiny_backbone_dir, case):
    method, backbone = _build(tiny_backbone_dir, case)
    _trained_like(method)
    with torch.no_grad():
        live = _logits(method, backbone, TIMES)
        hypernet = _hypernet(method)
        constant = hypernet.embed(torch.tensor([0.5]))
        hypernet.embed = lambda t: constant.expand(len(t), -1)  # its t input frozen
        frozen = _logits(method, backbone, TIMES)
        method.remove()
        bare = _logits(method, backbone, TIMES)
    assert not torch.allclose(live[0], live[-1], atol=1e-4)  # a different update at every t
    assert not torch.allclose(live[1], live[2], atol=1e-4)
    assert all(torch.allclose(frozen[0], row, atol=1e-6) for row in frozen[1:])  # one update for all t
    assert not torch.allclose(frozen[0], bare[0], atol=1e-4)  # and still an update


@pytest.mark.parametrize("case", ["nara", "nara_per_layer"])
def test_nara_hook_equals_the_merged_weight_at_a_fixed_t(tiny_backbone_dir, case):
    method, backbone = _build(tiny_backbone_dir, case, **{"nara.targets": "attention_mlp"})
    _trained_like(method)
    t = torch.full((4,), 0.37)
    with torch.no_grad():
        hooked = _logits(method, backbone, t)
        updates = {key: method.merged_update(key, 0.37) for key in method.adapters}
        method.remove()
        modules = dict(backbone.model.named_modules())
        for key, update in updates.items():
            modules[next(n for n in modules if n.replace(".", "_") == key)].weight += update
        merged = _logits(method, backbone, t)
    assert len(updates) == 2 * 6  # Q, K, V, O, FFN in and out in each of 2 blocks
    assert torch.allclose(hooked, merged, atol=1e-5)


@pytest.mark.parametrize("case", sorted(NOISE_AWARE))
def test_saved_and_reloaded_exactly(tiny_config, tmp_path, case):
    name, sets = NOISE_AWARE[case]
    config = tiny_config(method=name, **{"train.lr": 1e-2, **sets})
    recipe = Recipe(config)
    for _ in range(3):  # B moves at step 1, the hypernetwork's output layer from step 2
        recipe.train_step()
    out = tmp_path / "ckpt"
    checkpoint.save(out, recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    loaded = Recipe.from_checkpoint(out)
    hypernet = {n for n in recipe.method.state_to_save() if n.startswith(("core.", "t_core."))}
    assert hypernet and hypernet <= set(loaded.method.state_to_save())
    for n, tensor in recipe.method.state_to_save().items():
        assert torch.equal(loaded.method.state_to_save()[n], tensor), n
    batch = recipe.encode(recipe.validation_examples[:4])
    for r in (recipe, loaded):
        r.method.eval()
    with torch.no_grad():
        before, after = (r.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, TIMES)
                         for r in (recipe, loaded))
    assert torch.equal(before, after)
    if name != "nara":  # the continuous form is what the checkpoint's config says it is
        assert loaded.config.trajectory.t_conditioning == "continuous" and loaded.config.trajectory.num_phases == 1


def test_the_router_refuses_a_continuous_t_expert_by_name(tiny_config, tmp_path):
    from lora_diffusion.core.methods.router import read_expert

    name, sets = NOISE_AWARE["trajectory_t_continuous"]
    recipe = Recipe(tiny_config(method=name, **sets))
    checkpoint.save(tmp_path / "ckpt", recipe.method, recipe.config, recipe.fingerprint, recipe.backbone.source)
    with pytest.raises(UserError, match="field router.checkpoints: .* continuous-t"):
        read_expert(str(tmp_path / "ckpt"), recipe.fingerprint)


def test_the_hypernetwork_is_counted_beside_the_low_rank_factors(tiny_backbone_dir):
    r, embed, hidden = 4, 32, 32
    nara, _ = _build(tiny_backbone_dir, "nara")
    linears = 2 * 4  # tiny model: 2 blocks x Q/K/V/O, 32 wide
    hypernet = embed * hidden + hidden + hidden * r * r + r * r
    assert account(nara)["trainable_params"] == linears * r * (32 + 32) + hypernet
    per_layer, _ = _build(tiny_backbone_dir, "nara_per_layer")
    assert account(per_layer)["trainable_params"] == account(nara)["trainable_params"] + linears * embed
    continuous, _ = _build(tiny_backbone_dir, "trajectory_continuous")
    assert account(continuous)["trainable_params"] == 2 * 32 * r + embed * hidden + hidden + hidden * r + r


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("case", sorted(NOISE_AWARE))
def test_bf16_backbone_with_fp32_parameters(tiny_backbone_dir, case, autocast):
    """The precision convention: a bf16 backbone, fp32 method parameters, forward and backward
    under the recipe's autocast and without it; the output in the backbone's dtype."""
    method, backbone = _build(tiny_backbone_dir, case, dtype=torch.bfloat16)
    method.train()
    _trained_like(method)
    params = method.trainable()
    assert all(p.dtype == torch.float32 for p in params.values())
    ids, attn, select = _inputs(backbone)
    method.set_context(Context(t=TIMES))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = backbone.logits(ids, attn, select)
        assert _hypernet(method)(TIMES).dtype == torch.float32  # t's function in fp32, also under autocast
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               and torch.isfinite(p.grad).all() for p in params.values())
    assert all(bool(p.grad.ne(0).any()) for p in params.values())


def test_nara_computes_its_core_once_per_forward_without_gradients(tiny_backbone_dir):
    """Every row of a sampler step shares t: with the cache the hypernetwork runs once per forward
    (one row), without it once per target linear (every row); the logits agree. Mixed t rows and
    training compute per row; an in-place update of the hypernetwork is not served stale."""
    method, backbone = _build(tiny_backbone_dir, "nara")
    _trained_like(method)
    step_t, linears = torch.full((4,), 0.6), len(method.adapters)
    with torch.no_grad():
        for t in (step_t, TIMES):
            method.core_evaluations = 0
            cached = _logits(method, backbone, t)
            assert method.core_evaluations == 1
            method.nc.cache_core = False
            uncached = _logits(method, backbone, t)
            assert method.core_evaluations == 1 + linears
            method.nc.cache_core = True
            assert torch.allclose(cached, uncached, atol=1e-6)
        ids, attn, select = _inputs(backbone)
        method.set_context(Context(t=step_t))
        first = backbone.logits(ids, attn, select)
        method.core.out.bias.add_(0.5)  # same Context, hypernetwork changed in place
        second = backbone.logits(ids, attn, select)
        method.set_context(None)
    assert not torch.allclose(first, second)
    method.core_evaluations = 0
    _logits(method, backbone, step_t).sum()  # with gradients: each hook computes its own core
    assert method.core_evaluations == linears


def test_the_sampler_runs_the_hypernetwork_once_per_step(tiny_config):
    """In the reverse process every row of a step has the step's t: one core per step, and the
    same tokens as recomputing it in every layer for every row."""
    from lora_diffusion.core import diffusion

    recipe = Recipe(tiny_config(method="nara", task="xquad", **{"nara.rank": 4, "generation.response_tokens": 4}))
    _trained_like(recipe.method)
    recipe.method.eval()
    batch = recipe.encode(recipe.validation_examples[:4])
    mask_id, steps = recipe.backbone.mask_token_id, 4  # the sampler masks the response itself
    filled, denoise, forwards = {}, recipe.denoiser(batch), []

    def counted(*args):
        forwards.append(1)
        return denoise(*args)
    for cache in (True, False):
        recipe.method.nc.cache_core, recipe.method.core_evaluations = cache, 0
        forwards.clear()
        filled[cache] = diffusion.sample(counted, batch, mask_id, steps, "low_confidence",
                                         torch.Generator().manual_seed(0), "linear")
        per_forward = 1 if cache else len(recipe.method.adapters)
        assert len(forwards) == steps and recipe.method.core_evaluations == steps * per_forward
    assert torch.equal(filled[True], filled[False])


@pytest.mark.parametrize("sets, field", [
    ({"trajectory.t_conditioning": "smooth"}, "trajectory.t_conditioning"),
    ({"trajectory.t_conditioning": "continuous"}, "trajectory.num_phases"),  # the default 4 phases
    ({"trajectory.t_conditioning": "continuous", "trajectory.num_phases": 1, "trajectory.sharing": "shared"},
     "trajectory.sharing"),
    ({"trajectory.t_conditioning": "continuous", "trajectory.num_phases": 1, "trajectory.rank_schedule": "linear"},
     "trajectory.rank_schedule"),
    ({"trajectory.t_conditioning": "continuous", "trajectory.num_phases": 1,
      "trajectory.phase_boundaries": [0.0, 0.5, 1.0]}, "trajectory.phase_boundaries"),
    ({"nara.rank": 0}, "nara.rank"),
    ({"nara.targets": "mlp"}, "nara.targets"),
    ({"nara.embed_dim": 7}, "nara.embed_dim"),
    ({"nara.hidden": 0}, "nara.hidden"),
    ({"nara.alpha": 0}, "nara.alpha"),
])
def test_conflicting_settings_name_the_field(sets, field):
    with pytest.raises(UserError, match=f"field {field}:"):
        config_lib.from_dict({}, sets)


def test_both_entry_points_of_continuous_t_build_the_same_module(tiny_backbone_dir):
    """`method=trajectory_continuous` (its phase settings ignored) is `method=trajectory` with
    t_conditioning continuous and one phase: same tensors, same logits."""
    named, backbone = _build(tiny_backbone_dir, "trajectory_continuous", **{"trajectory.num_phases": 4})
    _trained_like(named)
    field, other = _build(tiny_backbone_dir, "trajectory_t_continuous")
    _trained_like(field)
    assert named.state_to_save().keys() == field.state_to_save().keys()
    with torch.no_grad():
        assert torch.equal(_logits(named, backbone, TIMES), _logits(field, other, TIMES))


def test_the_comparison_and_the_grids_have_their_rows():
    from lora_diffusion.engine.grid import load_grid
    from lora_diffusion.experiments import comparison, tuning

    assert {"nara", "trajectory_continuous"} <= set(comparison.ALL_METHODS)
    for method in ("nara", "trajectory_continuous"):
        cands = tuning.candidates(method, 4, 73728, comparison.LR_GRIDS[method], comparison.BASE_SETS)
        assert len(cands) == 4
    for task in ("xquad", "xsum"):
        grid = load_grid(REPO / "search_spaces" / f"grid_{task}_noise_aware.yaml")
        cells = {c["method"]: c for c in grid.cells()}
        assert set(cells) == {"lora", "nara", "trajectory", "trajectory_continuous"} and grid.seeds == [0, 1, 2]
        assert cells["nara"]["nara.rank"] == cells["lora"]["lora.rank"]  # twins at equal rank
        assert cells["trajectory"]["trajectory.num_phases"] == 1  # the single shared module
        assert cells["trajectory_continuous"]["trajectory.rank"] == cells["trajectory"]["trajectory.rank"]
