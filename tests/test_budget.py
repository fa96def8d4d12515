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


def test_comparison_runs_matched_methods_and_writes_the_table(tiny_backbone_dir, real_data_dir, tmp_path):
    from lora_diffusion import comparison

    spec = comparison.ComparisonSpec(
        methods=["lora", "bitfit"], tasks=["sst2"], seeds=[0, 1], steps=1, budget=2500,
        search_steps=1, search_dev_examples=8,
        lr_grids={"lora": [1e-3, 3e-3], "bitfit": [1e-2]},
        sets={"backbone": str(tiny_backbone_dir), "data_dir": str(real_data_dir), "max_length": 32,
              "max_train_examples": 32, "max_eval_examples": 16, "train_accuracy_examples": 8,
              "train.batch_size": 4, "train.warmup_steps": 1, "diffusion.eval_t_points": 1})
    result = comparison.run_comparison(spec, log=None)
    assert len(result["runs"]) == 4
    lora, bitfit = result["summary"]
    assert lora["method"] == "lora" and lora["budget_matched"] and lora["seeds"] == 2
    assert abs(lora["trainable_params"] - 2500) <= 250
    assert not bitfit["budget_matched"] and bitfit["knob"] is None  # fixed size, said so
    assert len(result["lr_search"][0]["trials"]) == 2 and result["lr_search"][1]["trials"] == []
    # seed 0 draws the searched dev rows too (nested seeded subsets): they are left out
    assert all(r["dev_unseen/examples"] == 8 for r in result["runs"] if r["seed"] == 0)
    json_path, md_path = comparison.write_outputs(result, tmp_path)
    table = md_path.read_text()
    assert "| sst2 | lora | lora.rank=5 |" in table and "fixed size" in table
