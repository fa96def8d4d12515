"""A run where users run it: the batch on an accelerator, a bf16 checkpoint, the memory controls.

- Device: every method trains, scores and samples with the model and batch on a device other
  than the CPU generator's (support/fake_device.py: the meta device holding real numbers, every
  op checked as CUDA checks it). On the code before issue 41, `diffusion.apply_mask` combined
  its CPU draws with the batch and the first training step failed here as on a GPU.
- Precision: every method x family on a tiny checkpoint saved in bf16 trains under bf16-mixed
  with its frozen weights left bf16, its trainable parameters, saved tensors and optimiser state
  fp32, and a first-step loss within 3% of the fp32 policy's on the same weights.
- Memory controls: activation checkpointing, micro-batches and the head in chunks change no
  gradient (every method x family; dropout off, since micro-batches draw dropout per slice).
"""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from lora_diffusion.core import config as config_lib, recipe as recipe_lib
from lora_diffusion.core.backbone import Backbone, load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.recipe import Recipe
from support import tiny_families
from support.fake_device import DEVICE, FakeDevice
from test_families import MATRIX, NOT_APPLICABLE, SMALL
from test_methods_matrix import CASES

FAMILIES = tiny_families.FAMILIES
MEMORY_CONTROLS = {"train.gradient_checkpointing": True, "train.micro_batch_size": 2, "train.logits_chunk_rows": 1}
LOSS_RTOL = 0.03  # bf16 autocast against fp32 on the same bf16 weights, tiny random models


@pytest.fixture(scope="module")
def tiny_bert(tiny_backbone_dir):
    torch.manual_seed(0)  # the head MiniLM-style checkpoints lack is seeded
    return load_backbone(str(tiny_backbone_dir))


def _copy(backbone: Backbone) -> Backbone:
    return Backbone(copy.deepcopy(backbone.model), backbone.tokenizer, backbone.source, backbone.family)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_trains_scores_and_samples_on_another_device(tiny_config, tiny_bert, case):
    method, sets = CASES[case]
    config = tiny_config(method=method, **sets, **MEMORY_CONTROLS, **{"diagnostics.per_t_rows": 4})
    backbone = _copy(tiny_bert)  # loaded outside: transformers builds on meta while loading
    with FakeDevice():
        recipe = Recipe(config, device=DEVICE, backbone=backbone)
        assert {p.device for p in recipe.method.parameters()} == {DEVICE}
        assert math.isfinite(recipe.train_step()["train/loss"])
        out = recipe.evaluate(recipe.validation_examples, "validation")  # the ELBO and the sampler
        out.update(recipe.diagnostics.per_t(recipe.validation_examples, "validation"))
    assert 0 <= out["validation/accuracy"] <= 1 and "validation/per_t/bound_bin0" in out


@pytest.mark.parametrize("method", ["trajectory", "tlora", "lora"])
def test_generation_runs_end_to_end_on_another_device(tiny_config, tiny_bert, method):
    """A generation task's whole run: training, the reference ELBO, the sampler decoding many
    tokens over many steps, the final result with its test split and phase gains."""
    config = tiny_config(method=method, task="xquad", max_length=48, **{
        "generation.response_tokens": 4, "train.steps": 2, "trajectory.num_phases": 2,
        "diagnostics.per_t_rows": 4, "max_eval_examples": 4})
    with FakeDevice():
        result = Recipe(config, device=DEVICE, backbone=_copy(tiny_bert)).run(log=None)
    assert math.isfinite(result["test/elbo_nats_per_token"]) and "test/f1" in result


# ------------------------------------------------------------------------------------------ bf16


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    """Each family's tiny checkpoint, saved again with its weights in bf16 (LLaDA and Dream ship
    bf16; transformers loads the stored dtype)."""
    root = tmp_path_factory.mktemp("bf16-families")
    out = {}
    for family in FAMILIES:
        source = tiny_families.build(family, root / f"{family}-fp32")
        target = root / family
        shutil.copytree(source, target)
        torch.manual_seed(0)
        model = load_backbone(str(source), trust_remote_code=True).model.to(torch.bfloat16)
        model.save_pretrained(target)
        out[family] = target
    return out


def _family_config(directory, method, data_dir, out_dir, **sets):
    return config_lib.from_dict({}, {
        "backbone": str(directory), "trust_remote_code": True, "method": method,
        "data_dir": str(data_dir), "max_length": 24, "max_train_examples": 16, "max_eval_examples": 4,
        "train_accuracy_examples": 4, "output_dir": str(out_dir), "train.steps": 2,
        "train.batch_size": 4, "train.eval_every": 2, "train.warmup_steps": 1, "train.lr": 1e-2,
        "trajectory.injection_layers": [0], "diffusion.sampler_steps": 2, "diagnostics.per_t_bins": 0,
        **SMALL, **sets})


def _recipe(directory, method, data_dir, tmp_path, **sets) -> Recipe:
    torch.manual_seed(0)
    return Recipe(_family_config(directory, method, data_dir, tmp_path / "out", **sets))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(MATRIX))
def test_every_method_trains_on_a_bf16_checkpoint_with_fp32_trainables(bf16_dirs, synthetic_data_dir,
                                                                       tmp_path, family, method):
    if (method, family) in NOT_APPLICABLE:
        pytest.skip("the method does not apply to the family (test_families checks its error)")
    mixed = _recipe(bf16_dirs[family], method, synthetic_data_dir, tmp_path, **{"train.precision": "bf16-mixed"})
    own = [list(m.parameters(recurse=False)) for m in mixed.backbone.model.modules()]
    training = {id(p) for ps in own if any(p.requires_grad for p in ps) for p in ps}  # BitFit: its biases' modules
    frozen = [p for ps in own for p in ps if id(p) not in training]  # (a tied embedding is one tensor)
    assert frozen or method == "full"
    assert {p.dtype for p in frozen} <= {torch.bfloat16}, "frozen weights left in the checkpoint's dtype"
    loss = mixed.train_step()["train/loss"]
    assert {p.dtype for p in mixed.params} == {torch.float32}
    assert {t.dtype for t in mixed.method.state_to_save().values()} == {torch.float32}
    states = [s for s in mixed.optimizer.state.values() for s in s.values() if s.dim() > 0]
    assert states and {s.dtype for s in states} == {torch.float32}
    reference = _recipe(bf16_dirs[family], method, synthetic_data_dir, tmp_path, **{"train.precision": "fp32"})
    assert math.isclose(loss, reference.train_step()["train/loss"], rel_tol=LOSS_RTOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_trains_under_bf16_mixed_on_an_fp32_checkpoint(tiny_config, tiny_bert, case):
    """MiniLM-style fp32 weights under autocast: activations come out fp32 or bf16 op by op, and a
    method mixing them (a bf16 delta written into an fp32 buffer) fails only here."""
    method, sets = CASES[case]
    config = tiny_config(method=method, **sets, **{"train.precision": "bf16-mixed", "diagnostics.per_t_rows": 4})
    recipe = Recipe(config, backbone=_copy(tiny_bert))
    assert math.isfinite(recipe.train_step()["train/loss"])
    assert {p.dtype for p in recipe.params} == {torch.float32}
    assert 0 <= recipe.evaluate(recipe.validation_examples, "validation")["validation/accuracy"] <= 1


def test_auto_precision_is_fp32_on_a_cpu_and_bf16_keeps_trainables_bf16(bf16_dirs, synthetic_data_dir, tmp_path):
    auto = _recipe(bf16_dirs["bert"], "lora", synthetic_data_dir, tmp_path)
    assert auto.precision == "fp32" and {p.dtype for p in auto.backbone.model.parameters()} == {torch.float32}
    true_bf16 = _recipe(bf16_dirs["bert"], "lora", synthetic_data_dir, tmp_path, **{"train.precision": "bf16"})
    assert {p.dtype for p in true_bf16.backbone.model.parameters()} == {torch.bfloat16}
    assert math.isfinite(true_bf16.train_step()["train/loss"])


# --------------------------------------------------------------------------------- memory controls
# prefix tuning where attention is a call (prefix_sdpa.py) refuses checkpointing, naming the field
NOT_CHECKPOINTABLE = {("prefix", f) for f in ("modernbert", "llada", "dream", "mdlm")}


def _gradients(directory, method, data_dir, tmp_path, monkeypatch, pristine, **sets) -> dict:
    monkeypatch.setattr(recipe_lib, "load_backbone", lambda *a, **k: _copy(pristine))
    recipe = _recipe(directory, method, data_dir, tmp_path, **sets)
    for module in recipe.method.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    recipe.train_step()
    return {n: p.grad.clone() for n, p in recipe.method.trainable().items()}


@pytest.fixture(scope="module")
def fp32_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {f: tiny_families.build(f, root / f) for f in FAMILIES}
    torch.manual_seed(0)
    return {f: (d, load_backbone(str(d), trust_remote_code=True)) for f, d in dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(MATRIX))
def test_checkpointing_micro_batches_and_chunked_head_change_no_gradient(fp32_families, synthetic_data_dir,
                                                                         tmp_path, monkeypatch, family, method):
    if (method, family) in NOT_APPLICABLE:
        pytest.skip("the method does not apply to the family (test_families checks its error)")
    directory, pristine = fp32_families[family]
    if (method, family) in NOT_CHECKPOINTABLE:
        with pytest.raises(UserError, match="train.gradient_checkpointing"):
            _gradients(directory, method, synthetic_data_dir, tmp_path, monkeypatch, pristine, **MEMORY_CONTROLS)
        return
    plain = _gradients(directory, method, synthetic_data_dir, tmp_path, monkeypatch, pristine)
    saving = _gradients(directory, method, synthetic_data_dir, tmp_path, monkeypatch, pristine, **MEMORY_CONTROLS)
    assert plain.keys() == saving.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(saving[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_a_recomputed_block_sees_the_forward_t(fp32_families, synthetic_data_dir, tmp_path, monkeypatch):
    """T-LoRA's hooks sit inside the blocks: recomputed without the forward's Context they would
    add nothing (checkpoint's recomputation check fails, or B gets no gradient)."""
    directory, pristine = fp32_families["bert"]
    grads = _gradients(directory, "tlora", synthetic_data_dir, tmp_path, monkeypatch, pristine,
                       **{"train.gradient_checkpointing": True})
    assert all(bool(g.ne(0).any()) for n, g in grads.items() if n.endswith(".B"))
