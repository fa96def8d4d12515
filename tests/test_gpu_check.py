"""The GPU check's CPU smoke version (`gpu-check --size tiny`): the same variants, step and sampler
timing and FLOP count as on a GPU, on a tiny LLaDA-shaped model; the GPU figures come from a GPU."""

from __future__ import annotations

import json
import math

import pytest

from lora_diffusion.experiments.bench import gpu


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    result = gpu.run("tiny", out=str(out))
    assert json.loads(out.read_text())["summary"] == result["summary"]
    return result


def test_every_variant_trains_its_loss_down_on_a_repeated_batch(tiny_result):
    rows = {r["variant"]: r for r in tiny_result["variants"]}
    assert set(rows) == {name for name, *_ in gpu.variants(4)}
    for r in rows.values():
        assert all(map(math.isfinite, r["losses"])) and r["losses"][-1] < r["losses"][0], r["variant"]
        assert r["step_s"] > 0 and r["sampler_step_s"] > 0 and r["sampler_step_base_s"] > 0
    assert tiny_result["summary"]["all_losses_fall"]
    # checkpointing recomputes, it does not change the update: the same losses, step by step
    for name in ("lora", "trajectory"):
        assert rows[f"{name} ckpt"]["losses"] == pytest.approx(rows[name]["losses"], rel=1e-3)


def test_flops_per_token_count_frozen_weights_twice_over_and_adapters_three_times(tiny_result):
    lora = next(r for r in tiny_result["variants"] if r["variant"] == "lora")
    c = gpu.TINY_LLADA
    d, layers, hidden, S = c["d_model"], c["n_layers"], c["mlp_hidden_size"], tiny_result["length"]
    frozen = layers * (4 * d * d + 3 * d * hidden)  # q, k, v, attn_out; ff_proj, up_proj, ff_out
    adapters = layers * 32 * (4 * (d + d) + 2 * (d + hidden) + (hidden + d))  # r = 32 on every linear
    expected = 4 * frozen + 6 * adapters + 12 * layers * S * d + 4 * c["vocab_size"] * d * lora["masked_fraction"]
    assert lora["flops_per_token"] == pytest.approx(expected)
    assert lora["mfu"] is None  # no GPU, no peak to divide by
