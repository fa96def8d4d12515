"""Every registered method on every backbone family, through the whole loop, on tiny random models
(support/tiny_families.py: transformers' BERT, RoBERTa, ModernBERT; stand-ins for LLaDA, Dream
and MDLM with the released module paths and forward signatures, loaded as remote code).

Per method x family: two Recipe steps (finite loss, every trainable tensor gets a gradient),
save, load through `Recipe.from_checkpoint` (bit-identical logits), and the reverse sampler
fills the response. The families' own declarations (blocks, mask id, shift, time) are checked
against the models first."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lora_diffusion.core import checkpoint, config as config_lib, diffusion, families, recipe as recipe_lib
from lora_diffusion.core.backbone import Backbone, backbone_fingerprint, load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods import registry
from lora_diffusion.core.recipe import Recipe
from support import tiny_families
from test_methods_matrix import MATRIX, NOT_IN_MATRIX

FAMILIES = tiny_families.FAMILIES
# Methods that cannot apply to a family, and the words their one UserError must name.
NOT_APPLICABLE = {("bitfit", "llada"): ("bitfit", "llada")}  # LLaDA's blocks have no biases
SMALL = {"solo.rank": 4, "gelora.samples": 8, "vera.rank": 8, "prefix.length": 2}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_families.build(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def pristine(family_dirs):
    """Each family loaded once by its real loader; tests take deep copies (methods inject)."""
    out = {}
    for family, path in family_dirs.items():
        torch.manual_seed(0)
        out[family] = load_backbone(str(path), trust_remote_code=True)
    return out


def _copy(backbone: Backbone) -> Backbone:
    """A fresh model to attach a method to; the tokenizer is shared (copying it costs seconds)."""
    return Backbone(copy.deepcopy(backbone.model), backbone.tokenizer, backbone.source, backbone.family)


def _config(family_dirs, family, method, data_dir, out_dir):
    return config_lib.from_dict({}, {
        "backbone": str(family_dirs[family]), "trust_remote_code": True, "method": method,
        "data_dir": str(data_dir), "max_length": 24, "max_train_examples": 16, "max_eval_examples": 4,
        "train_accuracy_examples": 4, "output_dir": str(out_dir), "train.steps": 2,
        "train.batch_size": 4, "train.eval_every": 2, "train.warmup_steps": 1, "train.lr": 1e-2,
        "trajectory.injection_layers": [0], "diffusion.sampler_steps": 2, **SMALL})


def test_families_declare_the_models_they_load(pristine):
    expected = {"bert": ("bert.encoder.layer", False, None), "roberta": ("roberta.encoder.layer", False, None),
                "modernbert": ("model.layers", False, None), "llada": ("model.transformer.blocks", False, None),
                "dream": ("model.layers", True, None), "mdlm": ("backbone.blocks", False, "timesteps")}
    for family, backbone in pristine.items():
        f = backbone.family
        assert f.name == family  # detected from config.json's model_type (backbone_family: auto)
        assert (f.blocks, f.shifted, f.time_argument) == expected[family]
        assert len(backbone.layers) == 2 and backbone.hidden_size == 16
    assert pristine["llada"].mask_token_id == 126336 == pristine["llada"].tokenizer.mask_token_id
    assert pristine["dream"].mask_token_id == 151666 == pristine["dream"].tokenizer.mask_token_id
    assert pristine["mdlm"].mask_token_id == 50257 == pristine["mdlm"].vocab_size - 1
    assert pristine["bert"].mask_token_id == pristine["bert"].tokenizer.mask_token_id


def _inputs(mask_id):
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 4] = mask_id
    return ids, torch.ones_like(ids), ids == mask_id


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_are_the_full_forward_realigned_at_the_selected_positions(pristine, family):
    """The separable head equals the model's own forward; Dream's output i - 1 predicts token i;
    only MDLM's logits depend on t."""
    backbone = pristine[family]
    backbone.model.eval()
    ids, attn, select = _inputs(backbone.mask_token_id)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        full = backbone.model(**backbone.family.forward_inputs(ids, attn, t)).logits
        got = backbone.logits(ids, attn, select, t)
        other_t = backbone.logits(ids, attn, select, torch.tensor([0.9, 0.2]))
    at = 3 if family == "dream" else 4
    assert torch.allclose(got, full[:, at], atol=1e-5)
    assert torch.equal(got, other_t) != (family == "mdlm")


def test_family_errors_name_the_field(family_dirs):
    with pytest.raises(UserError, match="field trust_remote_code"):
        load_backbone(str(family_dirs["llada"]))
    with pytest.raises(UserError, match="field backbone_family"):
        config_lib.from_dict({}, {"backbone_family": "gpt2"})
    assert families.detect({"model_type": "llada"}).name == "llada"
    with pytest.raises(UserError, match="field backbone_family"):
        families.detect({"model_type": "t5"})
    assert config_lib.from_dict({}).backbone_family == "auto"  # old config.json files load


def test_matrix_covers_every_registered_method():
    assert set(MATRIX) == set(registry.names()) - NOT_IN_MATRIX


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(MATRIX))
def test_method_trains_saves_loads_and_samples(pristine, family_dirs, synthetic_data_dir, tmp_path,
                                               monkeypatch, family, method):
    monkeypatch.setattr(recipe_lib, "load_backbone", lambda *a, **k: _copy(pristine[family]))
    config = _config(family_dirs, family, method, synthetic_data_dir, tmp_path / "out")
    if (method, family) in NOT_APPLICABLE:
        with pytest.raises(UserError, match=".*".join(NOT_APPLICABLE[method, family])):
            Recipe(config)
        return
    recipe = Recipe(config)
    assert recipe.fingerprint == backbone_fingerprint(pristine[family])
    params = recipe.method.trainable()
    for _ in range(2):
        assert math.isfinite(recipe.train_step()["train/loss"])
    assert all(p.grad is not None for p in params.values()), [n for n, p in params.items() if p.grad is None][:3]
    assert any(bool(p.grad.ne(0).any()) for p in params.values())

    checkpoint.save(tmp_path / "ckpt", recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    loaded = Recipe.from_checkpoint(tmp_path / "ckpt")
    batch = recipe.encode(recipe.validation_examples[:4])
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])
    for r in (recipe, loaded):
        r.method.eval()
    with torch.no_grad():
        before, after = (r.denoiser(batch)(batch.input_ids, batch.attention_mask, batch.response_mask, t)
                         for r in (recipe, loaded))
    assert torch.equal(before, after)

    mask_id = loaded.backbone.mask_token_id
    masked = diffusion.Batch(*(torch.where(batch.response_mask, torch.full_like(batch.input_ids, mask_id),
                                           batch.input_ids) if i == 0 else x
                               for i, x in enumerate((batch.input_ids, batch.attention_mask, batch.response_mask,
                                                      batch.prompt_mask, batch.task_ids))))
    ids = diffusion.sample(loaded.denoiser(masked), masked, mask_id, 2, "low_confidence",
                           torch.Generator().manual_seed(0), "linear")
    assert not (ids[batch.response_mask] == mask_id).any()
    assert torch.equal(ids[~batch.response_mask], batch.input_ids[~batch.response_mask])  # prompt kept
