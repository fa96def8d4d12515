"""The memory plan (core/memory_plan.py): every method attaches to a backbone built on the meta
device (or the plan says why it cannot), the plan's predicted peak is within 15% of the peak
measured on the CPU for a tiny run, the issue's LLaDA-8B targets hold, and a trial that cannot
fit is refused naming the field to change."""

from __future__ import annotations

import pytest

from lora_diffusion.cli import main
from lora_diffusion.core import config as config_lib, memory_plan
from lora_diffusion.core.accounting import account
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.memory_trace import measured_peak
from lora_diffusion.core.methods import registry

GIB = 2**30
# Methods the plan cannot build on the meta device, and why (the UserError says so).
CANNOT_PLAN = {
    "router": "composes trained trajectory checkpoints (router.checkpoints)",
    "lora_merge": "merges trained lora checkpoints (lora_merge.checkpoints)",
    "gelora": "sets its ranks from hidden states of training rows: it needs the weights",
    "prefix": "initialises its keys and values from word tokens read by the backbone",
}
LLADA_4x1024 = {"max_length": 1024, "train.batch_size": 4}
CHECKPOINTING = {"gradient_checkpointing": True}


def _config(**sets):
    return config_lib.from_dict({}, sets)


@pytest.mark.parametrize("method", [m for m in registry.names() if m not in CANNOT_PLAN])
def test_every_method_attaches_on_the_meta_device_and_is_planned(method):
    p = memory_plan.plan(_config(method=method, max_length=64), source="mdlm-owt")
    assert 0 < p.params_trainable <= p.params_total and p.activations > 0 and p.peak > p.weights


@pytest.mark.parametrize("method", sorted(CANNOT_PLAN))
def test_a_method_that_cannot_be_planned_is_one_line_naming_it(method):
    with pytest.raises(UserError, match=method):
        memory_plan.plan(_config(method=method, max_length=64), source="llada-8b")


def test_the_plan_counts_what_the_loaded_model_trains(tiny_config):
    """Counts on the meta device are the accounting function's on the loaded backbone."""
    from lora_diffusion.core.recipe import Recipe

    for method in ("trajectory", "lora", "full"):
        config = tiny_config(method=method)
        p = memory_plan.plan(config, device_type="cpu")
        assert p.params_trainable == account(Recipe(config).method)["trained_params"]


def test_predicted_peak_is_within_15_percent_of_the_measured_cpu_peak(tiny_config):
    """Tiny BERT, AG News rows (long enough that every batch is max_length wide), one label token
    a row, fp32 on the CPU: the plan against torch's allocator timeline over three steps."""
    from lora_diffusion.core.recipe import Recipe

    config = tiny_config(task="ag_news", max_length=24, **{"train.batch_size": 16})
    recipe = Recipe(config)
    assert recipe.encode(recipe.train_batch(0)).input_ids.shape == (16, 24)
    predicted = memory_plan.plan(config, device_type="cpu").peak
    measured = measured_peak(recipe, steps=3)
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_llada_8b_lora_and_trajectory_at_4x1024_fit_one_80gb_gpu_with_checkpointing():
    for method, sets in (("trajectory", {}), ("lora", {"lora.rank": 32, "lora.targets": "attention_mlp"})):
        p = memory_plan.plan(_config(method=method, **LLADA_4x1024, **sets), source="llada-8b",
                             response_tokens=1024, overrides=CHECKPOINTING)
        assert p.fit["fits"] and p.fit["gpus_per_trial"] == 1, memory_plan.describe(p)
        assert round(p.frozen_weights / GIB, 1) == 14.9


def test_llada_8b_full_fine_tuning_needs_sharding_over_several_80gb_gpus():
    p = memory_plan.plan(_config(method="full", **LLADA_4x1024), source="llada-8b", response_tokens=1024,
                         overrides=CHECKPOINTING)
    assert round(p.state / GIB) == 119  # fp32 weights, gradients and two AdamW moments
    assert not p.fit["fits"] and p.fit["gpus_per_trial"] >= 2


def test_checkpointing_keeps_block_inputs_only():
    config = _config(method="lora", **LLADA_4x1024)
    off = memory_plan.plan(config, source="llada-8b", overrides={"gradient_checkpointing": False})
    on = memory_plan.plan(config, source="llada-8b", overrides=CHECKPOINTING)
    assert on.activations < off.activations / 4


def test_logits_are_counted_at_masked_positions_in_chunks():
    assert memory_plan.logits_bytes(10, 1000, 4) == 10 * 1000 * 12
    assert memory_plan.logits_bytes(10**6, 1000, 2) == memory_plan.LOGITS_CHUNK_ROWS * 1000 * 14


def test_a_trial_that_cannot_fit_is_refused_naming_the_field():
    config = _config(method="full", **LLADA_4x1024)
    with pytest.raises(UserError, match=r"^field train\.gradient_checkpointing: a full trial of llada-8b needs"):
        memory_plan.refuse_unfit(config, gpu_memory_gib=80, source="llada-8b")
    assert memory_plan.refuse_unfit(_config(method="trajectory", **LLADA_4x1024), gpu_memory_gib=80,
                                    source="llada-8b").fit["fits"]


def test_plan_verb_prints_the_plan(capsys):
    assert main(["plan", "--backbone", "mdlm-owt", "--set", "max_length=128"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 169,678,418 total" in out or "parameters: 169," in out
    assert "fits one GPU yes" in out


def test_the_sweep_preflight_refuses_a_gpu_trial_that_cannot_fit_and_passes_cpu_trials():
    from lora_diffusion.engine import preflight

    config = _config(method="full", backbone="minilm", max_length=512, **{"train.batch_size": 4})
    preflight.check_memory(config, gpus_per_worker=0, workers=2, gpu_memory_gib=1)  # CPU: not planned
    with pytest.raises(UserError, match=r"^field train\.\w+: a full trial of minilm needs"):
        preflight.check_memory(config, gpus_per_worker=1, workers=1, gpu_memory_gib=0.25)
    preflight.check_memory(config, gpus_per_worker=1, workers=1, gpu_memory_gib=80)


def test_trajectory_activations_are_saved_from_its_injected_block_on_every_time():
    """The method's phase lookup reads real phase edges (a meta tensor has no values): blocks
    before the injection keep nothing, every block after it keeps the same, on every plan."""
    from lora_diffusion.core.memory_trace import trace_activations

    traces = []
    for _ in range(2):
        backbone, method = memory_plan.build_on_meta(_config(max_length=128), "mdlm-owt")
        traces.append(trace_activations(backbone, method.float(), 4, 128, 4))
    blocks = traces[0].per_block
    assert traces[0] == traces[1]
    assert blocks[:2] == [0, 0] and blocks[2] > 0 and len(set(blocks[3:])) == 1 and blocks[3] > blocks[2]


def test_precision_sets_the_bytes_of_frozen_and_trainable_tensors():
    """fp32 upcasts LLaDA's bf16 checkpoint; bf16-mixed keeps it, trainables fp32; bf16-true
    keeps trainables, their gradients and moments in bf16 (core/precision.py)."""
    config = _config(method="lora", max_length=128, **{"train.batch_size": 2})
    plans = {p: memory_plan.plan(config, source="llada-8b", overrides={"precision": p})
             for p in ("fp32", "bf16-mixed", "bf16")}
    n = plans["fp32"].params_trainable
    assert plans["fp32"].frozen_weights == 2 * plans["bf16-mixed"].frozen_weights == 2 * plans["bf16"].frozen_weights
    assert plans["bf16-mixed"].gradients == 4 * n and plans["bf16-mixed"].optimizer == 8 * n
    assert plans["bf16"].gradients == 2 * n and plans["bf16"].optimizer == 4 * n
    assert plans["fp32"].activations == 2 * plans["bf16-mixed"].activations
