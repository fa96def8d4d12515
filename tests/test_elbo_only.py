"""ELBO-only generation (generation.text_scores false): evaluation runs no sampler, and every
stage that selects (Tune, Optuna/ASHA, the best trial, the retrained selection, stage 1 of a
comparison, the reports) selects on validation/elbo_nats_per_token, lower is better."""

from __future__ import annotations

import math
from dataclasses import fields
from types import SimpleNamespace

import pandas as pd
import pytest

from lora_diffusion.core import diffusion
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.recipe import Recipe
from lora_diffusion.engine.spec import GridSpec, SweepSpec, selection_metric

ELBO = "validation/elbo_nats_per_token"
OFF = {"generation.text_scores": False}
GENERATION_SETS = {"max_length": 48, "generation.response_tokens": 6, "max_eval_examples": 6}


def test_elbo_only_evaluation_reports_the_bound_and_never_runs_the_sampler(tiny_config, monkeypatch):
    def no_sampler(*args, **kwargs):
        raise AssertionError("the sampler ran with generation.text_scores false")

    monkeypatch.setattr(diffusion, "sample", no_sampler)
    config = tiny_config(task="xquad", **GENERATION_SETS, **OFF, **{"trajectory.num_phases": 2})
    result = Recipe(config).run(log=None)
    for split in ("train", "validation", "test"):
        assert result[f"{split}/elbo_nats_per_token"] > 0
        assert not [k for k in result if k.startswith((f"{split}/exact_match", f"{split}/f1",
                                                       f"{split}/rouge", f"{split}/generation_s"))]
        assert f"samples_{split}" not in result
    assert {"test/phase_gain/0", "test/phase_gain/1"} <= set(result)  # phase gains use the ELBO
    assert any(k.startswith("validation/per_t/") for k in result)


def test_text_scores_must_be_true_or_false(tiny_config):
    assert tiny_config(task="xquad").generation.text_scores is True
    with pytest.raises(UserError, match="generation.text_scores"):
        tiny_config(task="xquad", **{"generation.text_scores": "no"})


def test_selection_metric_and_mode_follow_task_and_text_scores():
    from lora_diffusion.core.task_specs import metric_mode

    assert (selection_metric("xquad"), metric_mode(selection_metric("xquad"))) == ("validation/f1", "max")
    assert (selection_metric("xquad", False), metric_mode(selection_metric("xquad", False))) == (ELBO, "min")
    assert selection_metric("xsum", False) == ELBO
    for text_scores in (True, False):  # classification ignores the knob
        assert selection_metric("sst2", text_scores) == "validation/accuracy"
    assert metric_mode("final/" + ELBO) == "min" and metric_mode("final/validation/rougeL") == "max"


def _spec(fixed: dict, grid: GridSpec | None = None) -> SweepSpec:
    spec = SweepSpec(**{f.name: None for f in fields(SweepSpec)})
    spec.fixed, spec.grid = fixed, grid
    return spec


def test_a_sweeps_metric_and_mode_read_text_scores_from_fixed_axes_or_cells():
    assert (_spec({"task": "xquad", **OFF}).metric, _spec({"task": "xquad", **OFF}).mode) == (ELBO, "min")
    assert (_spec({"task": "xquad"}).metric, _spec({"task": "xquad"}).mode) == ("validation/f1", "max")
    cells = GridSpec(axes={}, seeds=[0], reference={}, cells=[{"task": "xquad", **OFF, "method": m}
                                                               for m in ("lora", "trajectory")])
    assert _spec({}, cells).mode == "min"
    axis = GridSpec(axes={"generation.text_scores": [False]}, seeds=[0], reference={}, cells=None)
    assert _spec({"task": "xsum"}, axis).metric == ELBO


def test_a_grid_mixing_text_scores_is_refused_naming_the_field(synthetic_data_dir):
    from lora_diffusion.core import config as config_lib
    from lora_diffusion.engine.spec import _check_data

    xquad = config_lib.from_dict({}, {"data_dir": str(synthetic_data_dir), "task": "xquad"})
    mixed_axis = GridSpec(axes={"generation.text_scores": [True, False]}, seeds=[0], reference={}, cells=None)
    mixed_cells = GridSpec(axes={}, seeds=[0], reference={}, cells=[{"lora.rank": 2}, {"lora.rank": 4, **OFF}])
    for grid in (mixed_axis, mixed_cells):
        with pytest.raises(UserError, match="generation.text_scores"):
            _check_data(xquad, grid)
    sst2 = config_lib.from_dict({}, {"data_dir": str(synthetic_data_dir)})
    _check_data(sst2, mixed_axis)  # classification ignores it: one metric


# ----------------------------------------------------------------------------- the best is the lowest bound


def _result(bound: float, tid: str):
    return SimpleNamespace(metrics={"trial_id": tid, "step": 4, ELBO: bound}, error=None,
                           config={"lora.rank": 4})


def test_best_result_and_the_selection_pick_the_lowest_bound():
    from lora_diffusion.engine import sweep
    from lora_diffusion.experiments import retrain

    results = [_result(2.3, "high"), _result(1.9, "low"), _result(math.nan, "nan")]
    assert sweep.best_result(results, ELBO).metrics["trial_id"] == "low"
    spec = _spec({"task": "xquad", **OFF, "method": "lora", "train.steps": 4})
    best = sweep._select(results, spec)
    assert best["trial_id"] == "low" and best["selection"] == {**best["selection"], "metric": ELBO,
                                                               "mode": "min", "score": 1.9}
    grid = retrain.retrain_grid(best, [3, 4], "search")  # the retrain stage runs ELBO-only too
    assert grid["fixed"]["generation.text_scores"] is False


def _elbo_rows(values: dict) -> list[dict]:
    """Finished ELBO-only XQuAD trials: (cell value, seed) -> validation bound (test: + 0.1)."""
    return [{"trial_id": f"t{a}{s}", "run_id": f"r{a}{s}", "status": "FINISHED", "seed": s, "task": "xquad",
             "method": "lora", "a": a, "generation.text_scores": False, "final/" + ELBO: v,
             "final/test/elbo_nats_per_token": v + 0.1, "trainable_params": p, "bytes_saved": 4 * p,
             "trained_params": p} for (a, s), v in values.items() for p in [100 if a == "x" else 50]]


def test_retrain_summary_and_line_report_the_bound_saying_lower_is_better():
    from lora_diffusion.experiments import retrain

    s = retrain.summarise(pd.DataFrame(_elbo_rows({("x", 3): 2.0, ("x", 4): 2.2})))
    assert s["metric"] == "elbo_nats_per_token" and s["test/elbo_nats_per_token"]["mean"] == pytest.approx(2.2)
    assert retrain.line(s).startswith("test/elbo_nats_per_token (lower is better) 2.2000")


def test_comparison_stage_one_chooses_the_lowest_bound():
    from lora_diffusion.experiments import tuning

    cells = [{"task": "xquad", "method": "lora", "train.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
    rows = [{**c, "status": "FINISHED", "generation.text_scores": False, "final/" + ELBO: v}
            for c, v in zip(cells, (2.4, 1.8, 2.1))]
    assert tuning.choose(cells, pd.DataFrame(rows))[("xquad", "lora")] == cells[1]


def test_grid_table_and_summary_use_the_bound_lower_is_better():
    from lora_diffusion.analysis import report, statistics
    from lora_diffusion.analysis.plots import _pareto_front
    from lora_diffusion.analysis.trials import task_metric

    df = pd.DataFrame(_elbo_rows({("x", 0): 2.0, ("x", 1): 2.2, ("y", 0): 2.5, ("y", 1): 2.6}))
    table = statistics.aggregate(df, ["a"], {"a": "x"})
    assert (table.attrs["metric"], table.attrs["mode"]) == ("final/" + ELBO, "min")
    assert table.iloc[1]["diff_mean"] == pytest.approx(0.45)  # cell - reference, in nats
    # y has fewer parameters but a higher bound: both are on the front, x the better
    assert _pareto_front(table, "min") == [(50, pytest.approx(2.55)), (100, pytest.approx(2.1))]
    summary = report._summary("s", df, table, ["a"], {"a": "x"}, table.attrs["metric"], [])
    assert "lower is better" in summary and "below 0 is better" in summary and "ELBO-only" in summary
    with pytest.raises(UserError, match="generation.text_scores"):
        task_metric(pd.DataFrame([{"task": "xquad", "generation.text_scores": False}, {"task": "xquad"}]))


def test_comparison_table_heads_the_bound_lower_is_better():
    from lora_diffusion.analysis import table

    record = {"seeds": [0, 1], "tasks": ["xquad"], "methods": ["lora"],
              "stages": {"matched": {"chosen": [{"task": "xquad", "method": "lora", "final_sweep": "f"}]}}}
    text = table.markdown(record, "matched", lambda sweep: pd.DataFrame(_elbo_rows({("x", 0): 2.0, ("x", 1): 2.2})))
    assert "XQuAD test elbo_nats_per_token (± std, lower is better)" in text and "2.200 ± 0.141" in text


def test_the_tuner_and_the_runs_view_minimise_the_bound(monkeypatch, tmp_path):
    from ray import tune

    from lora_diffusion.engine import tuner
    from lora_diffusion.engine.tracking import SweepTracker

    made = []
    monkeypatch.setattr(tune, "Tuner", lambda *a, **kw: made.append(kw["tune_config"]))
    spec = _spec({"task": "xquad", **OFF}, GridSpec(axes={"lora.rank": [2]}, seeds=[0], reference={}, cells=None))
    spec.kind, spec.sweep = "grid", SimpleNamespace(max_concurrent=1)
    tuner._grid_tuner(spec, None, None)
    assert (made[0].metric, made[0].mode) == (ELBO, "min")
    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", "elbo", sweep_id="elbo-0")
    tracker.save_runs_view(tracker.parent_run(), ["lora.rank"], ["final/" + ELBO])
    view = [v for k, v in tracker.client.get_experiment(tracker.experiment_id).tags.items() if "elbo-0" in k]
    assert '\\"orderByAsc\\": true' in view[0]


def test_an_xquad_grid_run_elbo_only_is_a_sweep_on_the_bound(tmp_path, monkeypatch, synthetic_data_dir):
    """What the grid headers say to run: `--set generation.text_scores=false` on a generative grid
    (here --smoke, its tiny backbone) gives a sweep minimising the bound, and --resume keeps it."""
    from lora_diffusion.engine.options import build_parser
    from lora_diffusion.engine.spec import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    args = build_parser("grid_rank_schedule").parse_args(
        ["--grid", "grid_xquad_sharing", "--smoke", "--set", "generation.text_scores=false",
         "--set", "trajectory.rank=16", "--set", "trajectory.min_rank=4",  # the tiny backbone is 32 wide
         "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    spec = prepare(args)
    assert (spec.metric, spec.mode) == (ELBO, "min") and spec.fixed["generation.text_scores"] is False
    assert SweepSpec.from_json(spec.to_json(), "sweep.json").mode == "min"


def test_a_search_space_sampling_text_scores_is_refused():
    from lora_diffusion.engine.spec import _refuse_sampled_sets

    space = SimpleNamespace(params=[SimpleNamespace(field="generation.text_scores")])
    with pytest.raises(UserError, match="generation.text_scores"):
        _refuse_sampled_sets(SimpleNamespace(set=[]), space, "space.yaml")
