"""The related-work baselines pinned to their definitions on small tensors and the tiny model:
PEFT's own parameter counts for the PEFT ones, AdaLoRA's budget schedule driven by the loop,
FouRA's transforms and gate, a SeLoRA growth event, GeLoRA's TwoNN estimate, Solo Connection's
homotopy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lora_diffusion.core import config as config_lib
from lora_diffusion.core.accounting import account
from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods import Context, build_method
from lora_diffusion.core.methods.foura import FouraConfig, FouraLayer, fourier_basis
from lora_diffusion.core.methods.gelora import block_ranks, two_nn_dimension
from lora_diffusion.core.methods.selora import GrowingLoRA, SeloraConfig
from lora_diffusion.core.methods.solo import homotopy
from lora_diffusion.core.recipe import Recipe


def _method(tiny_backbone_dir, data_dir, method, **sets):
    config = config_lib.from_dict({}, {"backbone": str(tiny_backbone_dir), "method": method,
                                       "data_dir": str(data_dir), **sets})
    torch.manual_seed(0)
    backbone = load_backbone(config.backbone)
    backbone.model.eval()
    pristine = copy.deepcopy(backbone.model)  # before the method injects into the model
    return build_method(config, backbone), backbone, pristine


# ------------------------------------------------------------------------------------ PEFT


@pytest.mark.parametrize("method, sets", [
    ("dora", {}), ("dora", {"lora.targets": "attention_mlp"}), ("adalora", {"adalora.init_r": 5}),
    ("vera", {"vera.rank": 16}), ("gelora", {"gelora.rank": 3})])
def test_peft_methods_count_what_peft_counts(tiny_backbone_dir, synthetic_data_dir, method, sets):
    from peft import get_peft_model

    m, _, pristine = _method(tiny_backbone_dir, synthetic_data_dir, method, **sets)
    peft_model = get_peft_model(pristine, copy.deepcopy(m.peft_config))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert account(m)["trainable_params"] == trainable


def test_vera_saves_the_scalings_not_the_shared_projections(tiny_backbone_dir, synthetic_data_dir):
    m, _, _ = _method(tiny_backbone_dir, synthetic_data_dir, "vera", **{"vera.rank": 16})
    saved = m.state_to_save()
    assert saved and all(".vera_lambda_b." in n or ".vera_lambda_d." in n for n in saved)
    layers = 2 * 4  # tiny model: 2 blocks x Q/K/V/O, 32 wide
    assert account(m)["trainable_params"] == layers * (16 + 32)
    again, _, _ = _method(tiny_backbone_dir, synthetic_data_dir, "vera", **{"vera.rank": 16})
    assert torch.equal(m.tuner.vera_A["default"], again.tuner.vera_A["default"])  # from the seed


def test_dora_is_lora_with_the_magnitude_vector(tiny_backbone_dir, synthetic_data_dir):
    dora, _, _ = _method(tiny_backbone_dir, synthetic_data_dir, "dora", **{"lora.rank": 2})
    lora, _, _ = _method(tiny_backbone_dir, synthetic_data_dir, "lora", **{"lora.rank": 2})
    magnitudes = [n for n in dora.trainable() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 8
    assert account(dora)["trainable_params"] == account(lora)["trainable_params"] + 8 * 32


def test_adalora_budget_follows_the_loops_step_counter(tiny_config):
    """The recipe calls `after_step` after every optimizer step: at the last step the rank
    allocator masks E down to the target budget (target_r per layer on average)."""
    recipe = Recipe(tiny_config(method="adalora", **{"adalora.init_r": 6, "adalora.target_fraction": 0.5,
                                                     "train.steps": 6, "adalora.tinit": 0.0,
                                                     "adalora.tfinal": 0.0, "adalora.delta_t": 2}))
    ranks = recipe.method.active_ranks()
    assert len(ranks) == 8 and all(r == 0 for r in ranks.values())  # E starts at zero
    recipe.train_step()
    assert sum(recipe.method.active_ranks().values()) == 6 * 8  # E trained, nothing masked yet
    for _ in range(5):
        recipe.train_step()  # masks at steps 2 and 4 as the budget falls; step 6 = total_step: final
    assert sum(recipe.method.active_ranks().values()) == 3 * 8
    assert recipe.method.tuner.peft_config["default"].rank_pattern  # PEFT recorded the pattern
    total, logs = recipe.method.regularization()
    assert total.item() > 0 and logs["reg_orth"] > 0


# ------------------------------------------------------------------------------------ FouRA


@pytest.mark.parametrize("kind", ["dft", "dct"])
@pytest.mark.parametrize("d", [6, 7, 32])
def test_foura_transform_round_trip(kind, d):
    f = fourier_basis(d, kind)
    x = torch.randn(3, d)
    assert torch.allclose(f @ f.T, torch.eye(d), atol=1e-5)  # orthonormal
    assert torch.allclose((x @ f.T) @ f, x, atol=1e-5)  # F^-1(F(x)) = x


def test_foura_dft_is_the_real_form_of_rfft():
    d = 8
    x = torch.randn(d, dtype=torch.float64)
    coeffs, spectrum = x.float() @ fourier_basis(d, "dft").T, torch.fft.rfft(x, norm="ortho")
    expected = [spectrum[0].real]
    for k in range(1, d // 2):
        expected += [math.sqrt(2) * spectrum[k].real, math.sqrt(2) * spectrum[k].imag]
    expected.append(spectrum[d // 2].real)
    assert torch.allclose(coeffs, torch.stack(expected).float(), atol=1e-5)


def test_foura_dct_is_scipys_orthonormal_dct_ii():
    scipy_fft = pytest.importorskip("scipy.fft")
    x = torch.randn(4, 10, dtype=torch.float64)
    ours = x.float() @ fourier_basis(10, "dct").T
    assert torch.allclose(ours, torch.from_numpy(scipy_fft.dct(x.numpy(), norm="ortho", axis=-1)).float(), atol=1e-5)


def test_foura_zero_init_identity_and_a_gate_on_input_and_t():
    layer = FouraLayer(torch.nn.Linear(12, 10), FouraConfig(rank=3))
    x = torch.randn(2, 5, 12)
    ctx = Context(t=torch.tensor([0.2, 0.9]))
    assert torch.equal(layer(x, ctx), torch.zeros(2, 5, 10))  # B = 0: no change at init
    with torch.no_grad():
        layer.B.normal_()
        layer.gate_t.fill_(3.0)
    same_x = x[:1].repeat(2, 1, 1)
    out = layer(same_x, ctx)
    assert not torch.allclose(out[0], out[1])  # the gate depends on t
    z = same_x[0] @ (layer.A @ layer.f_in).T  # the definition, spelled out
    g = torch.sigmoid(layer.gate(z) + 0.2 * layer.gate_t)
    assert torch.allclose(out[0], ((g * z) @ layer.B.T) @ layer.f_out * layer.scale, atol=1e-5)
    assert torch.equal(layer(x, None), torch.zeros(()))  # no time given: nothing added


# ------------------------------------------------------------------------------------ SeLoRA


def _growing(threshold=1.1):
    torch.manual_seed(0)
    return GrowingLoRA(torch.nn.Linear(8, 6), SeloraConfig(rank=3, init_rank=1, threshold=threshold))


def _backward(layer):
    layer.B.data[:, 0] = 0.01 * torch.randn(6)  # the active component has trained a little
    x, target = torch.randn(16, 8), torch.randn(16, 6)
    ((layer(x, None) - target) ** 2).sum().backward()


def test_selora_grows_a_layer_when_the_fisher_ratio_says_so():
    layer = _growing()
    _backward(layer)
    assert torch.equal(layer.B.grad[:, 1:], torch.zeros(6, 2))  # inactive columns: no gradient
    assert torch.equal(layer.A.grad[1:], torch.zeros(2, 8))  # their B is zero: A rows get none
    fisher = layer.fisher()
    expanded = fisher + float((layer.candidate_grad ** 2).sum())
    assert expanded / fisher > 1.1 and layer.maybe_grow(1.1) and layer.active == 2
    before = layer(torch.ones(1, 8), None)  # growing leaves the output unchanged (B[:, 1] = 0)
    assert torch.equal(before, layer(torch.ones(1, 8), None))


def test_selora_keeps_its_rank_below_the_threshold_and_at_the_maximum():
    layer = _growing(threshold=1e9)
    _backward(layer)
    assert not layer.maybe_grow(1e9) and layer.active == 1
    layer.active = 3
    assert not layer.maybe_grow(1.0)  # r_max reached


def test_selora_grows_through_the_loop_and_reloads_its_ranks(tiny_config, tmp_path):
    from lora_diffusion.core import checkpoint

    config = tiny_config(method="selora", **{"selora.rank": 4, "selora.check_every": 1, "selora.threshold": 1.0,
                                             "train.lr": 1e-2})
    recipe = Recipe(config)
    for _ in range(2):
        recipe.train_step()
    ranks = recipe.method.active_ranks()
    assert all(r == 3 for r in ranks.values())  # one component per check, from 1
    accounting = account(recipe.method)
    assert accounting["trainable_params"] == 8 * 4 * (32 + 32)  # r_max is counted (and matched)
    assert accounting["active_params"] == 8 * 3 * (32 + 32) and accounting["active_ranks"] == ranks
    assert recipe.method.regularization()[1]["active_params"] == 8 * 3 * (32 + 32)  # logged per step
    checkpoint.save(tmp_path / "ckpt", recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    loaded = Recipe.from_checkpoint(tmp_path / "ckpt")
    assert loaded.method.active_ranks() == dict.fromkeys(ranks, 2)  # the third has not trained yet
    assert account(loaded.method)["active_params"] == 8 * 2 * (32 + 32)


# ------------------------------------------------------------------------------------ GeLoRA


def test_two_nn_finds_the_dimension_of_a_linear_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 3, generator=g))[0]
    points = torch.rand(1500, 3, generator=g) @ basis.T  # a 3-d cube inside R^20
    assert abs(two_nn_dimension(points) - 3) < 0.3


def test_two_nn_finds_the_dimension_of_a_swiss_roll():
    g = torch.Generator().manual_seed(1)
    u, v = 1.5 * math.pi * (1 + 2 * torch.rand(2000, generator=g)), 20 * torch.rand(2000, generator=g)
    roll = torch.stack([u * torch.cos(u), v, u * torch.sin(u)], 1)  # a 2-d surface in R^3
    embed = torch.linalg.qr(torch.randn(20, 3, generator=g))[0]
    assert abs(two_nn_dimension(roll @ embed.T) - 2) < 0.3
    duplicated = torch.cat([roll, roll[:50]])  # repeated inputs (r1 = 0) are dropped
    assert abs(two_nn_dimension(duplicated) - 2) < 0.3


def test_gelora_ranks_follow_the_growth_of_the_dimension(tiny_backbone_dir, synthetic_data_dir):
    assert block_ranks([5.0, 9.0, 6.0, 6.0], 3) == [6, 1, 1]  # weights 5, 1, 1 scaled to mean 3
    m, _, _ = _method(tiny_backbone_dir, synthetic_data_dir, "gelora", **{"gelora.rank": 2})
    assert len(m.intrinsic_dims) == 3 and all(d > 0 for d in m.intrinsic_dims)
    assert m.block_ranks == block_ranks(m.intrinsic_dims, 2)
    _, logs = m.regularization()
    assert logs["intrinsic_dim_0"] == m.intrinsic_dims[0] and "rank_block_1" in logs
    ranks = {n: mod.r["default"] for n, mod in m.model.named_modules() if hasattr(mod, "lora_A")}
    assert sorted(set(ranks.values())) == sorted(set(m.block_ranks))


def test_gelora_checkpoint_loads_without_the_training_data(tiny_config, tmp_path):
    """The checkpoint's config records the estimated dimensions: rebuilding the method from it
    reads no data, and gives the same rank pattern and the same tensors."""
    from lora_diffusion.core import checkpoint

    recipe = Recipe(tiny_config(method="gelora", **{"gelora.rank": 2, "gelora.samples": 32}))
    recipe.train_step()
    assert recipe.config.gelora.intrinsic_dims is None  # the run's own config is left as it was
    checkpoint.save(tmp_path / "ckpt", recipe.method, recipe.config, recipe.fingerprint, recipe.backbone.source)
    config, tensors, _ = checkpoint.read(tmp_path / "ckpt", {"data_dir": str(tmp_path / "absent")})
    assert config.gelora.intrinsic_dims == recipe.method.intrinsic_dims
    loaded = build_method(config, load_backbone(config.backbone))
    loaded.load_saved(tensors)
    assert loaded.block_ranks == recipe.method.block_ranks
    assert all(torch.equal(p, recipe.method.trainable()[n]) for n, p in loaded.trainable().items())
    config.gelora.intrinsic_dims = None  # without the record it would need the data
    with pytest.raises(UserError):
        build_method(config, load_backbone(config.backbone))


# ------------------------------------------------------------------------------------ Solo


def test_solo_is_the_identity_at_homotopy_zero(tiny_backbone_dir, synthetic_data_dir):
    m, backbone, _ = _method(tiny_backbone_dir, synthetic_data_dir, "solo", **{"solo.rank": 4})
    with torch.no_grad():
        m.skip["B"].normal_()  # a trained connection
    ids = torch.randint(1000, 2000, (2, 8))
    ids[:, 3] = backbone.mask_token_id
    attn, select = torch.ones_like(ids), ids == backbone.mask_token_id
    m.train()
    backbone.model.eval()  # dropout off: only the connection differs
    outputs = {}
    for lam in (0.0, 1.0):
        m.lam = lam
        outputs[lam] = backbone.logits(ids, attn, select)
    m.eval()  # evaluation uses the end of the path, lambda = 1
    assert torch.equal(backbone.logits(ids, attn, select), outputs[1.0])
    assert m.regularization()[1]["skip_ratio"] > 0  # the connection's size beside x_to, logged
    m.lam = 0.0
    m.train()
    backbone.model.eval()
    backbone.logits(ids, attn, select)
    assert m.regularization()[1]["skip_ratio"] == 0.0
    m.remove()
    base = backbone.logits(ids, attn, select)
    assert torch.equal(outputs[0.0], base) and not torch.allclose(outputs[1.0], base)


def test_solo_homotopy_follows_the_step_counter(tiny_config):
    assert [homotopy(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    recipe = Recipe(tiny_config(method="solo", **{"solo.ramp": 0.5, "train.steps": 8}))
    assert recipe.method.lam == 0.25  # the first step trains at lambda(1)
    recipe.train_step()
    assert recipe.method.lam == 0.5
    recipe.load_state_dict({**recipe.state_dict(), "step": 5})  # resuming sets it from the step
    assert recipe.method.lam == 1.0
    default = Recipe(tiny_config(method="solo", **{"train.steps": 150}))
    assert default.method.ramp_steps == 15  # short by default: see solo.py on AdamW and lambda


@pytest.mark.parametrize("sets, field", [
    ({"method": "solo", "solo.from_block": 1, "solo.to_block": 0}, "solo.to_block"),
    ({"method": "solo", "solo.from_block": 7}, "solo.from_block"),
    ({"adalora.target_fraction": 0}, "adalora.target_fraction"),
    ({"adalora.tinit": 0.5, "adalora.tfinal": 0.5}, "adalora.tfinal"),
    ({"selora.init_rank": 5, "selora.rank": 4}, "selora.init_rank"),
    ({"foura.transform": "wavelet"}, "foura.transform"),
    ({"nara.embed_dim": 7}, "nara.embed_dim"),  # NaRA's own checks: tests/test_noise_aware.py
    ({"method": "nara", "nara.rank": 0}, "nara.rank"),
    ({"vera.targets": "mlp"}, "vera.targets"),
    ({"gelora.samples": 2}, "gelora.samples"),
    ({"method": "gelora", "gelora.intrinsic_dims": [3.0, 4.0]}, "gelora.intrinsic_dims"),
    ({"gelora.intrinsic_dims": [3.0, 0.0, 4.0]}, "gelora.intrinsic_dims"),
])
def test_bad_settings_name_the_field(tiny_backbone_dir, synthetic_data_dir, sets, field):
    with pytest.raises(UserError, match=f"field {field}:"):
        config = config_lib.from_dict({}, {"backbone": str(tiny_backbone_dir), "data_dir": str(synthetic_data_dir),
                                           **sets})
        build_method(config, load_backbone(config.backbone))
