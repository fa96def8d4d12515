"""Real-size stand-ins without weights (core/standin.py): the shipped configs build on the meta
device at their released parameter counts as `Backbone`s of their family, and a stand-in built
with random weights on a device in a dtype runs the family's forward."""

from __future__ import annotations

import pytest
import torch

from lora_diffusion.core import standin
from lora_diffusion.core.errors import UserError
from support import tiny_families

# Parameter counts of the released checkpoints (unique tensors, tied embeddings once).
RELEASED = {"llada-8b": 8_015_581_184, "dream-7b": 7_615_616_512,  # Qwen2.5-7B's count
            "modernbert-large": 395_881_664, "mdlm-owt": 169_627_218}
FAMILY = {"llada-8b": "llada", "dream-7b": "dream", "modernbert-large": "modernbert", "mdlm-owt": "mdlm"}


def _weight_bytes(backbone) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in backbone.model.parameters()}.values())


def test_shipped_configs_are_the_four_released_backbones():
    assert standin.shipped_names() == sorted(RELEASED)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_shipped_config_builds_on_meta_at_its_released_size(name):
    backbone = standin.build_standin(name)
    assert backbone.parameter_count() == RELEASED[name]
    assert backbone.family.name == FAMILY[name]
    assert all(p.device.type == "meta" for p in backbone.model.parameters())
    assert len(backbone.layers) > 0 and 0 <= backbone.mask_token_id < backbone.vocab_size


def test_llada_8b_is_8_02b_parameters_and_14_9_gib_of_bf16_weights():
    backbone = standin.build_standin("llada-8b")
    assert round(backbone.parameter_count() / 1e9, 2) == 8.02
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    assert round(_weight_bytes(backbone) / 2**30, 1) == 14.9
    assert backbone.mask_token_id == 126336


@pytest.mark.parametrize("family,dtype", [("llada", torch.bfloat16), ("dream", torch.bfloat16),
                                          ("mdlm", torch.float32), ("modernbert", torch.float32)])
def test_standin_with_random_weights_runs_the_family_forward(family, dtype, tmp_path):
    """A tiny checkpoint directory's config.json, built on the CPU in the dtype its released
    checkpoint stores (MDLM's norms upcast to fp32, as released: bf16 MDLM needs autocast):
    logits at the selected positions, finite."""
    directory = tiny_families.build(family, tmp_path / family)
    backbone = standin.build_standin(str(directory), device="cpu", dtype=dtype)
    assert {p.dtype for p in backbone.model.parameters()} == {dtype}
    ids = torch.randint(0, 1000, (2, 8))
    select = torch.zeros(2, 8, dtype=torch.bool)
    select[:, 3:6] = True
    with torch.no_grad():
        logits = backbone.logits(ids, torch.ones(2, 8, dtype=torch.long), select, torch.full((2,), 0.5))
    assert logits.shape == (6, backbone.vocab_size) and torch.isfinite(logits.float()).all()


def test_random_weights_are_seeded():
    a = standin.build_standin("mdlm-owt", device="cpu", seed=1).model.backbone.blocks[0].attn_out.weight
    b = standin.build_standin("mdlm-owt", device="cpu", seed=1).model.backbone.blocks[0].attn_out.weight
    assert torch.equal(a, b)


def test_unknown_source_is_one_line_naming_the_shipped_configs():
    with pytest.raises(UserError, match="llada-8b"):
        standin.build_standin("no-such-model")
