"""The per-t diagnostic and the phase gains (core/diagnostics.py): bins over (0, 1], the backbone
being the method switched off for every method, phases switched off one at a time, and the
figures reaching MLflow and the grid report's plot."""

from __future__ import annotations

import math

import pytest
import torch

from lora_diffusion.core import config as config_lib, diagnostics
from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.methods import Context, build_method, registry
from lora_diffusion.core.recipe import Recipe

GENERATION_SETS = {"task": "xquad", "max_length": 48, "generation.response_tokens": 6, "max_eval_examples": 6}
BINS = 10


def trained_like(recipe_or_method, seed: int = 1):
    """Random non-zero trainable tensors: every module changes the logits."""
    method = getattr(recipe_or_method, "method", recipe_or_method)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    method.eval()
    return recipe_or_method


def _inputs(backbone, t):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (len(t), 12), generator=g)
    ids[:, 5:8] = backbone.mask_token_id
    return ids, torch.ones_like(ids), ids == backbone.mask_token_id


def test_the_bins_cover_zero_to_one_in_ten_equal_parts():
    edges = diagnostics.bin_edges(BINS)
    assert len(edges) == BINS and edges[0][0] == 0.0 and edges[-1][1] == 1.0
    assert all(math.isclose(hi, lo2) for (_, hi), (lo2, _) in zip(edges, edges[1:]))
    assert all(math.isclose(hi - lo, 0.1) for lo, hi in edges)
    assert all(lo < t <= hi for t, (lo, hi) in zip(diagnostics.bin_times(BINS, 1e-3), edges))


SWITCHABLE = [n for n in registry.names() if n not in ("router", "lora_merge")]  # both compose trained checkpoints


@pytest.mark.parametrize("name", SWITCHABLE)
def test_every_method_switched_off_is_the_bare_backbone(tiny_backbone_dir, synthetic_data_dir, name):
    """Trained-like tensors, then switched off: the logits of a backbone that never saw the
    method; after, the method's own logits again (its hooks back in their places)."""
    config = config_lib.from_dict({}, {"backbone": str(tiny_backbone_dir), "method": name,
                                       "data_dir": str(synthetic_data_dir), "trajectory.injection_layers": [0]})
    bare = load_backbone(config.backbone)
    backbone = load_backbone(config.backbone)
    bare.model.eval()
    method = build_method(config, backbone)
    method.remember_start()
    trained_like(method)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])
    ids, attn, select = _inputs(backbone, t)
    method.set_context(Context(t=t, prompt_mask=torch.zeros_like(select), task_ids=torch.zeros(4, dtype=torch.long)))
    with torch.no_grad():
        on = backbone.logits(ids, attn, select, t)
        with method.switched_off():
            off = backbone.logits(ids, attn, select, t)
        again = backbone.logits(ids, attn, select, t)
        expected = bare.logits(ids, attn, select, t)
    assert torch.allclose(off, expected, atol=1e-5)
    assert not torch.allclose(on, expected, atol=1e-3)  # the method does change the logits
    assert torch.equal(again, on)


@pytest.mark.parametrize("sets", [{}, {"method": "lora"}, GENERATION_SETS])
def test_a_fresh_method_scores_as_the_backbone_in_every_bin(tiny_config, sets):
    recipe = Recipe(tiny_config(**sets))
    out = recipe.diagnostics.per_t(recipe.validation_examples, "validation")
    method = [out[f"validation/per_t/bound_bin{k}"] for k in range(BINS)]
    backbone = [out[f"validation/per_t/backbone_bound_bin{k}"] for k in range(BINS)]
    assert len(out) == 2 * BINS and all(v > 0 for v in method)
    assert method == pytest.approx(backbone, rel=1e-6)


def test_the_backbone_figures_are_an_untrained_methods_and_the_trained_one_differs(tiny_config):
    fresh = Recipe(tiny_config())
    trained = trained_like(Recipe(tiny_config()))
    rows = trained.validation_examples
    out = trained.diagnostics.per_t(rows, "validation")
    untrained = diagnostics.bound_by_bin(fresh, rows[:fresh.config.diagnostics.per_t_rows], BINS)
    assert [out[f"validation/per_t/backbone_bound_bin{k}"] for k in range(BINS)] == pytest.approx(untrained, rel=1e-6)
    assert [out[f"validation/per_t/bound_bin{k}"] for k in range(BINS)] != pytest.approx(untrained, rel=1e-3)
    assert trained.diagnostics.per_t(rows, "validation") == out  # cached at this state
    assert Recipe(tiny_config(**{"diagnostics.per_t_bins": 0})).diagnostics.per_t(rows, "validation") == {}


def test_per_t_bins_unset_follow_the_role_and_a_set_number_runs_at_every_evaluation(tiny_config):
    search = {"evaluation.role": "search"}
    assert [diagnostics.per_t_bins(tiny_config(), final) for final in (False, True)] == [0, BINS]
    assert [diagnostics.per_t_bins(tiny_config(**search), final) for final in (False, True)] == [0, 0]
    set_ = {"diagnostics.per_t_bins": 3}
    assert [diagnostics.per_t_bins(tiny_config(**search, **set_), final) for final in (False, True)] == [3, 3]
    assert diagnostics.phase_gains_on(tiny_config()) and not diagnostics.phase_gains_on(tiny_config(**search))


@pytest.mark.parametrize("sets", [{"trajectory.sharing": "per_phase"}, {"trajectory.sharing": "shared"},
                                  {"method": "trajectory_adapter"}])
def test_switching_a_phase_off_changes_only_the_rows_of_that_phase(tiny_config, sets):
    recipe = trained_like(Recipe(tiny_config(**{"trajectory.num_phases": 4, **sets})))
    method, backbone = recipe.method, recipe.backbone
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])  # one row in each phase
    ids, attn, select = _inputs(backbone, t)
    rows = select.nonzero()[:, 0]  # the row of each selected position
    with torch.no_grad():
        on = recipe.denoise(ids, attn, select, t)
        with method.switched_off():
            bare = recipe.denoise(ids, attn, select, t)
        with method.switched_off(phases={1}):
            off = recipe.denoise(ids, attn, select, t)
    assert method.phase_modules() == [0, 1, 2, 3]
    assert torch.equal(off[rows != 1], on[rows != 1])
    assert torch.allclose(off[rows == 1], bare[rows == 1], atol=1e-6)
    assert not torch.allclose(on[rows == 1], bare[rows == 1], atol=1e-3)


@pytest.mark.parametrize("sets", [{}, GENERATION_SETS])
def test_a_zero_phase_module_gains_nothing(tiny_config, sets):
    recipe = trained_like(Recipe(tiny_config(**{"trajectory.num_phases": 4, **sets})))
    with torch.no_grad():
        for layer in recipe.method.injection.values():
            layer.phases["phase2"].B.zero_()
    result = recipe.result(wall_time=0.0)
    gains = {k: result[f"test/phase_gain/{k}"] for k in range(4)}
    assert gains[2] == 0.0
    if sets:  # the ELBO moves with every module; 16 rows' accuracy may well not
        assert result["test/phase_gain_metric"] == "elbo_nats_per_token (off - all)"
        assert all(g != 0.0 for k, g in gains.items() if k != 2)
    else:
        assert result["test/phase_gain_metric"] == "accuracy" and all(-1 <= g <= 1 for g in gains.values())


@pytest.mark.parametrize("sharing", ["per_phase", "shared"])
def test_generative_phase_gains_equal_switching_each_phase_off_in_turn(tiny_config, sharing):
    """The two-pass phase gains are the definition's K passes: the reference ELBO with phase k's
    module off minus the ELBO with all on, the same masks; and "all on" is the split's reported
    ELBO (Recipe.evaluate), so a gain reads against the number in the table."""
    from lora_diffusion.core import diffusion, generation
    from lora_diffusion.core.diffusion import seeded

    recipe = trained_like(Recipe(tiny_config(**{"trajectory.num_phases": 4, "trajectory.sharing": sharing,
                                                "generation.text_scores": False, **GENERATION_SETS})))
    c, rows = recipe.config, recipe.test_examples
    times = diffusion.stratified_times(recipe.method.phase_boundaries(), c.diffusion.eval_t_points, c.diffusion.t_min)

    def elbo():
        return float(generation.reference_elbo_by_point(recipe, rows, times, recipe.config.evaluation.batch_size,
                                                        seeded(c.train.seed, 7)).sum())

    gains = recipe.diagnostics.phase_gains(rows, "test", {})
    all_on = elbo()
    reported = recipe.evaluate(rows, "test", sampler=False)
    assert reported["test/elbo_nats_per_token"] == pytest.approx(all_on, abs=1e-6)
    for k in range(4):
        with recipe.method.switched_off(phases={k}):
            assert gains[f"test/phase_gain/{k}"] == pytest.approx(elbo() - all_on, abs=1e-5)
    assert all(gains[f"test/phase_gain/{k}"] != 0.0 for k in range(4))


def test_generative_phase_gains_reuse_the_test_evaluations_pass(tiny_config, monkeypatch):
    """After the test split's evaluation at this state, the phase gains run one ELBO pass (all
    phase modules off), not two: the all-on pass is the evaluation's; a step later it is not."""
    from lora_diffusion.core import generation

    recipe = trained_like(Recipe(tiny_config(**{"trajectory.num_phases": 4, "generation.text_scores": False,
                                                "train.steps": 2, **GENERATION_SETS})))
    passes = []
    by_point = generation.reference_elbo_by_point
    monkeypatch.setattr(generation, "reference_elbo_by_point", lambda *a, **k: passes.append(1) or by_point(*a, **k))
    rows = recipe.test_examples
    recipe.evaluate(rows, "test", sampler=False)
    assert len(passes) == 1
    recipe.diagnostics.phase_gains(rows, "test", {})
    assert len(passes) == 2
    recipe.train_step()
    recipe.diagnostics.phase_gains(rows, "test", {})
    assert len(passes) == 4


def test_one_phase_has_no_phase_gains(tiny_config):
    recipe = Recipe(tiny_config(**{"trajectory.num_phases": 1}))
    assert recipe.diagnostics.phase_gains(recipe.test_examples, "test", {"test/accuracy": 0.5}) == {}


def test_the_figures_reach_mlflow_and_the_grid_plot(tiny_config, tmp_path):
    from lora_diffusion.analysis.report import write_report
    from lora_diffusion.engine.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "per-t", sweep_id="per-t-0001")
    tracker.parent_run()
    for schedule in ("constant", "reversed"):
        config = tiny_config(**{"trajectory.rank_schedule": schedule, "trajectory.min_rank": 1})
        run = tracker.trial_run(schedule, params=config.flat(), tags={"task": "sst2", "seed": 0})
        recipe = Recipe(config)
        result = recipe.run(report=lambda metrics, rec, run=run: tracker.log_step(run, metrics, rec.step), log=None)
        tracker.log_final(run, result, recipe.step)
        tracker.end_run(run)
    # unset (diagnostics.per_t_bins None): at the final evaluation of a result run only
    history = tracker.client.get_metric_history(run, "validation/per_t/bound_bin9")
    assert sorted(m.step for m in history) == [4]
    metrics = tracker.client.get_run(run).data.metrics
    assert {f"validation/per_t/backbone_bound_bin{k}" for k in range(BINS)} <= set(metrics)
    assert {f"final/test/phase_gain/{k}" for k in range(4)} <= set(metrics)
    files = write_report(uri, "per-t", ["trajectory.rank_schedule"], None, tmp_path / "report")
    assert files["per_t"].is_file()
    parent = tracker.parent_run()
    assert "ablation/per_t.png" in {f.path for f in tracker.client.list_artifacts(parent, "ablation")}
