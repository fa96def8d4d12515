"""Budget matching on the tiny model: every knob lands within 10%, fixed-size methods say so."""

import pytest
import torch

from lora_diffusion import config as config_lib
from lora_diffusion.backbone import load_backbone
from lora_diffusion.budget import KNOBS, count_params, knob_of, match_budget
from lora_diffusion.errors import UserError


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    torch.manual_seed(0)
    return load_backbone(str(tiny_backbone_dir))


def _config(backbone, method, **sets):
    return config_lib.from_dict({}, {"backbone": backbone.source, "method": method,
                                     "trajectory.injection_layers": [1], **sets})


@pytest.mark.parametrize("method", sorted(KNOBS))
@pytest.mark.parametrize("target", [2500, 6000])
def test_match_lands_within_ten_percent(backbone, method, target):
    config = match_budget(_config(backbone, method), backbone, target)
    got = count_params(config, backbone)
    assert abs(got - target) <= 0.10 * target, (method, got)
    assert config.method == method and config.flat()[knob_of(method)] >= 1


def test_min_rank_is_clamped_below_a_small_rank(backbone):
    config = match_budget(_config(backbone, "tlora", **{"tlora.rank": 8, "tlora.min_rank": 4}),
                          backbone, 1100)
    assert config.tlora.min_rank <= config.tlora.rank < 4


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_fixed_size_methods_report_their_size(backbone, method):
    config = _config(backbone, method)
    size = count_params(config, backbone)
    with pytest.raises(UserError, match=f"no size knob; its size is fixed at {size}"):
        match_budget(config, backbone, 1000)
    assert match_budget(config, backbone, 1000, fixed_ok=True) is config


def test_unreachable_budgets_raise(backbone):
    with pytest.raises(UserError, match="cannot reach"):  # rank 1 LoRA is already 512 params
        match_budget(_config(backbone, "lora"), backbone, 100)
    with pytest.raises(UserError, match="cannot reach"):  # rank is capped by the hidden size 32
        match_budget(_config(backbone, "trajectory"), backbone, 10**7)


def test_matching_leaves_the_backbone_untouched(backbone):
    before = {n: p.clone() for n, p in backbone.model.state_dict().items()}
    match_budget(_config(backbone, "lora"), backbone, 3000)
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
