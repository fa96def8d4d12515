"""Every method through the same checks on the tiny model: identity at init, one optimiser step
touches only the method's parameters, save/load/evaluate reproduces, accounting equals the file,
and exactly the t-dependent methods respond to t."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lora_diffusion.core import checkpoint, checkpoint_files, config as config_lib
from lora_diffusion.core.accounting import account
from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods import Context, build_method, registry
from lora_diffusion.core.methods.tlora import tlora_rank
from lora_diffusion.core.recipe import Recipe

# name -> (predicate on trainable names, identity at init, depends on t)
MATRIX = {
    "trajectory": (lambda n: n.startswith(("injection.", "t_core.")), True, True),  # t_core: continuous t
    "full": (lambda n: n.startswith("model."), True, False),
    "lora": (lambda n: ".lora_A." in n or ".lora_B." in n, True, False),
    # prefix tuning changes the output at init by construction: a prefix key always receives
    # softmax weight, and no zero-init removes it (see methods/prefix.py)
    "prefix": (lambda n: n.startswith("prefix"), False, False),
    "adapter": (lambda n: n.startswith("adapters."), True, False),
    "bitfit": (lambda n: n.startswith("model.") and n.endswith(".bias"), True, False),
    "tlora": (lambda n: n.startswith("adapters.") and n.rsplit(".", 1)[1] in ("A", "B"), True, True),
    "trajectory_adapter": (lambda n: n.startswith(("injection.", "t_core.")), True, True),
    "dora": (lambda n: any(k in n for k in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")), True, False),
    "adalora": (lambda n: any(k in n for k in (".lora_A.", ".lora_B.", ".lora_E.")), True, False),
    "vera": (lambda n: ".vera_lambda_" in n, True, False),
    "foura": (lambda n: n.startswith("adapters."), True, True),
    "selora": (lambda n: n.startswith("adapters.") and n.rsplit(".", 1)[1] in ("A", "B"), True, False),
    "gelora": (lambda n: ".lora_A." in n or ".lora_B." in n, True, False),
    "solo": (lambda n: n.startswith("skip."), True, False),
    "nara": (lambda n: n.startswith(("adapters.", "core.")), True, True),
    "trajectory_continuous": (lambda n: n.startswith(("injection.", "t_core.")), True, True),
}
VARIANTS = {  # extra configurations that take the same checks
    "lora_mlp": ("lora", {"lora.targets": "attention_mlp"}),
    "prefix_projection": ("prefix", {"prefix.projection": 8}),  # saves the computed prefix
    "prefix_projection_mlp": ("prefix", {"prefix.projection": 8, "prefix.save": "mlp"}),
    "adapter_houlsby": ("adapter", {"adapter.placement": "houlsby"}),
    "trajectory_adapter_shared": ("trajectory_adapter", {"trajectory.sharing": "shared",
                                                         "trajectory.rank_schedule": "linear"}),
    "trajectory_conditioned": ("trajectory", {"trajectory.num_tasks": 1}),  # A(c), task id 0
    "trajectory_t_continuous": ("trajectory", {"trajectory.t_conditioning": "continuous", "trajectory.num_phases": 1}),
    "trajectory_t_continuous_conditioned": ("trajectory", {"trajectory.t_conditioning": "continuous",
                                                           "trajectory.num_phases": 1, "trajectory.num_tasks": 1}),
    "trajectory_adapter_continuous": ("trajectory_adapter", {"trajectory.t_conditioning": "continuous",
                                                             "trajectory.num_phases": 1}),
    "nara_per_layer": ("nara", {"nara.layer_embedding": True, "nara.targets": "attention_mlp"}),
}
CASES = {**{m: (m, {}) for m in MATRIX}, **VARIANTS}


# composition methods that need trained checkpoints to exist; tested in their own modules
NOT_IN_MATRIX = {"router", "lora_merge"}


def test_matrix_covers_every_registered_method():
    assert set(MATRIX) == set(registry.names()) - NOT_IN_MATRIX


def _build(tiny_backbone_dir, method, data_dir=None, **sets):
    config = config_lib.from_dict({}, {"backbone": str(tiny_backbone_dir), "method": method, "data_dir": data_dir,
                                       "trajectory.injection_layers": [1], **sets})
    torch.manual_seed(0)
    backbone = load_backbone(config.backbone)
    backbone.model.eval()
    return config, backbone


def _inputs(backbone, B=4, S=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (B, S), generator=g)
    ids[:, 5] = backbone.mask_token_id
    ids[:, 9] = backbone.mask_token_id
    attn = torch.ones_like(ids)
    if B > 1:
        attn[1, 10:] = 0  # one padded row
    return ids, attn, ids == backbone.mask_token_id


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_at_initialisation(tiny_backbone_dir, synthetic_data_dir, case):
    method, sets = CASES[case]
    config, backbone = _build(tiny_backbone_dir, method, str(synthetic_data_dir), **sets)
    ids, attn, select = _inputs(backbone)
    base = backbone.logits(ids, attn, select)
    m = build_method(config, backbone).eval()
    m.set_context(Context(t=torch.tensor([0.1, 0.4, 0.6, 0.95]), task_ids=torch.zeros(4, dtype=torch.long)))
    out = backbone.logits(ids, attn, select)
    if MATRIX[method][1]:
        assert torch.equal(base, out)
    else:
        assert not torch.allclose(base, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_changes_only_the_methods_parameters(tiny_config, case):
    method, sets = CASES[case]
    recipe = Recipe(tiny_config(method=method, **sets))
    trainable = recipe.method.trainable()
    is_intended = MATRIX[method][0]
    assert trainable and all(is_intended(n) for n in trainable), sorted(trainable)[:5]
    trainable_ids = {id(p) for p in trainable.values()}
    backbone = recipe.backbone.model.state_dict(keep_vars=True)  # every backbone tensor
    before = {n: t.detach().clone() for n, t in backbone.items()}
    before_trainable = {n: p.detach().clone() for n, p in trainable.items()}
    recipe.train_step()
    for name, tensor in backbone.items():
        if id(tensor) not in trainable_ids:
            assert torch.equal(tensor.detach(), before[name]), f"frozen tensor {name} changed"
    changed = [n for n, p in trainable.items() if not torch.equal(p.detach(), before_trainable[n])]
    assert changed, "no trainable tensor moved"
    if method == "full":
        assert len(trainable) == len({id(p) for p in recipe.backbone.model.parameters()})


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_evaluate_and_accounting(tiny_config, tmp_path, case):
    method, sets = CASES[case]
    config = tiny_config(method=method, **{"train.lr": 1e-2, **sets})
    recipe = Recipe(config)
    batch = recipe.encode(recipe.validation_examples[:4])
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])

    def logits_of(r):
        r.method.eval()
        with torch.no_grad():
            return r.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, t)

    untrained = logits_of(recipe)
    for _ in range(2):
        recipe.train_step()
    validation = recipe.evaluate(recipe.validation_examples, "validation")
    logits = logits_of(recipe)
    out = tmp_path / "ckpt"
    checkpoint.save(out, recipe.method, config, recipe.fingerprint, recipe.backbone.source)

    loaded = Recipe.from_checkpoint(out)
    assert loaded.evaluate(loaded.validation_examples, "validation") == validation
    assert torch.equal(logits_of(loaded), logits)
    assert not torch.equal(untrained, logits)  # so loading restored what training changed

    acc = account(recipe.method)
    tensors = load_file(out / checkpoint_files.WEIGHTS)
    assert acc["trainable_params"] == sum(v.numel() for v in tensors.values())
    assert acc["trained_params"] == sum(p.numel() for p in recipe.method.trainable().values())
    reparameterised = recipe.method.training_state()  # trains through tensors it does not save
    if reparameterised:
        assert set(reparameterised) == set(recipe.method.trainable())
    else:
        assert acc["trainable_params"] == sum(p.numel() for p in recipe.method.trainable().values())
    assert acc["bytes_saved"] == (out / checkpoint_files.WEIGHTS).stat().st_size


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_t_dependent_methods_respond_to_t(tiny_backbone_dir, synthetic_data_dir, case):
    method, sets = CASES[case]
    config, backbone = _build(tiny_backbone_dir, method, str(synthetic_data_dir), **sets)
    m = build_method(config, backbone).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stands in for training: every trainable tensor gets a perturbation
        for p in m.trainable().values():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    ids, attn, select = _inputs(backbone, B=1)
    ids, attn, select = ids.repeat(2, 1), attn.repeat(2, 1), select.repeat(2, 1)
    m.set_context(Context(t=torch.tensor([0.1, 0.9]), task_ids=torch.zeros(2, dtype=torch.long)))
    out = backbone.logits(ids, attn, select).view(2, -1)
    if MATRIX[method][2]:
        assert not torch.allclose(out[0], out[1])
    else:
        assert torch.equal(out[0], out[1])
    # what evaluation relies on to compute the logits once for every t (core/evaluation.py)
    assert (m.context_free_blocks() is None) == (not MATRIX[method][2])


def test_tlora_rank_mask_follows_the_schedule(tiny_backbone_dir):
    t = torch.tensor([1.0, 0.999, 0.5, 0.01, 1e-3])
    assert tlora_rank(t, 8, 1).tolist() == [1, 1, 4, 7, 8]  # T-LoRA: the cleanest step gets r_max
    assert tlora_rank(t, 8, 1, power=2.0).tolist() == [1, 1, 2, 7, 8]  # fewer components sooner
    mid = 1e-3 + (1 - 1e-3) * torch.tensor([0.125, 0.375, 0.625, 0.875, 1.0])  # T = 4 steps: k = 0..4
    assert tlora_rank(mid, 5, 1, timesteps=4).tolist() == [5, 4, 3, 2, 1]
    config, backbone = _build(tiny_backbone_dir, "tlora", **{"tlora.rank": 4, "tlora.min_rank": 2})
    m = build_method(config, backbone)
    mod = next(iter(m.adapters.values()))
    assert torch.allclose(mod.A @ mod.A.T, torch.eye(4), atol=1e-5)  # orthonormal rows at init
    with torch.no_grad():
        mod.B.normal_()
    x = torch.randn(2, 5, mod.A.shape[1])
    keep = torch.arange(4) < tlora_rank(torch.tensor([1.0, 0.0]), 4, 2)[:, None]
    delta = mod.delta(x, keep, 1.0)
    assert torch.linalg.matrix_rank(delta[0]) == 2 and torch.linalg.matrix_rank(delta[1]) == 4


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_prefix_respects_padding(tiny_backbone_dir, attn_impl):
    """The extended mask keeps padding invisible: a row alone equals the same row padded."""
    config, backbone = _build(tiny_backbone_dir, "prefix")
    backbone.model.set_attn_implementation(attn_impl)
    build_method(config, backbone).eval()
    ids, attn, select = _inputs(backbone)
    row = ids[1:2, :10]
    alone = backbone.logits(row, torch.ones_like(row), row == backbone.mask_token_id)
    padded = backbone.logits(ids, attn, select).view(4, 2, -1)[1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_lora_injection_goes_through_backbone_logits(tiny_backbone_dir):
    config, backbone = _build(tiny_backbone_dir, "lora")
    m = build_method(config, backbone)
    names = [n for n, mod in backbone.model.named_modules() if hasattr(mod, "lora_A")]
    assert len(names) == 2 * 4 and not any(n.endswith("intermediate.dense") for n in names)
    ids, attn, select = _inputs(backbone)
    backbone.logits(ids, attn, select).sum().backward()
    assert all(p.grad is not None for n, p in m.trainable().items() if ".lora_B." in n)


@pytest.mark.parametrize("sets, field", [
    ({"adapter.bottleneck": 0}, "adapter.bottleneck"),
    ({"adapter.placement": "middle"}, "adapter.placement"),
    ({"prefix.length": 0}, "prefix.length"),
    ({"prefix.projection": -1}, "prefix.projection"),
    ({"prefix.save": "seeds"}, "prefix.save"),
    ({"tlora.rank": 2, "tlora.min_rank": 3}, "tlora.min_rank"),
    ({"tlora.targets": "mlp"}, "tlora.targets"),
    ({"tlora.rank_power": 0}, "tlora.rank_power"),
    ({"tlora.timesteps": 0}, "tlora.timesteps"),
])
def test_config_errors_name_the_field(sets, field):
    with pytest.raises(UserError, match=f"field {field}:"):
        config_lib.from_dict({}, sets)


# Gradient coverage. Rule: every element of every tensor counted as trainable gets a non-zero
# gradient in at least one of COVERAGE_STEPS optimiser steps whose batches spread t evenly over
# [t_min, 1], both ends included. Several steps, not one: B = 0 at init makes A's gradient zero
# at the first step, and only an optimiser step on B lets A's gradient through. Exempt: rows of
# embedding tables (full fine-tuning), which only get gradient for the ids and positions a batch
# looks up: there, every table must get some gradient.
# A ReLU unit that no token activates gets no gradient by design of ReLU, so the bottleneck
# adapters run this check with GELU: it is about what a method masks or routes, not dead units.
# SeLoRA counts its maximum rank while a layer's later components train only once grown: here
# every layer may grow at every step (check_every 1, any Fisher gain), so rank 2 is active from
# the second step and the check says the grown component trains. Whether a real run grows to its
# maximum is the method's own question (its active ranks), not this one.
COVERAGE_STEPS = 3
COVERAGE_SETS = {"adapter": {"adapter.activation": "gelu"},
                 "selora": {"selora.rank": 2, "selora.check_every": 1, "selora.threshold": 1.0}}


def _embedding_tables(model) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_counted_parameter_gets_gradient_across_the_t_range(tiny_config, monkeypatch, case):
    from lora_diffusion.core import diffusion

    method, sets = CASES[case]
    recipe = Recipe(tiny_config(method=method, **sets, **COVERAGE_SETS.get(method, {})))
    monkeypatch.setattr(diffusion, "sample_times",
                        lambda B, t_min, gen, device=None: torch.linspace(t_min, 1.0, B, device=device))
    params = recipe.method.trainable()
    touched = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    for _ in range(COVERAGE_STEPS):
        recipe.train_step()
        for n, p in params.items():
            if p.grad is not None:
                touched[n] |= p.grad != 0
    tables = _embedding_tables(recipe.backbone.model)
    never = {n: f"{int((~hit).sum())} of {hit.numel()}" for n, hit in touched.items()
             if not (hit.any() if id(params[n]) in tables else hit.all())}
    assert not never, f"never got gradient: {dict(list(never.items())[:5])}"
