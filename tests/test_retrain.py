"""A sweep's follow-up stage: the selected configuration retrained with fresh seeds, reported on test.

The search selects on validation; its best validation score is only the selection score. The
retrain stage (experiments/retrain.py, run by cli.sweep_main) must use seeds the search never used,
report test as mean ± std over them with validation beside it (best.json, the search's MLflow
parent run), and a rerun must not train it again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lora_diffusion.analysis.trials import TEST_METRIC, VALIDATION_METRIC
from lora_diffusion.engine import grid as grid_lib
from lora_diffusion.experiments import retrain

REPO = Path(__file__).resolve().parents[1]


def test_fresh_seeds_are_never_the_search_seeds():
    assert retrain.fresh_seeds([0, 1, 2], 3) == [3, 4, 5]
    assert retrain.fresh_seeds([7, 0], 2) == [8, 9]
    assert retrain.fresh_seeds([], 1) == [0]


def test_retrain_grid_is_the_selected_configuration_with_fresh_seeds():
    best = {"trial_id": "t1", "config": {"method": "lora", "lora.rank": 4, "train.seed": 0, "train.lr": 1e-3}}
    grid = grid_lib.parse_grid(retrain.retrain_grid(best, [1, 2], "s"), "retrain.yaml")
    assert grid.seeds == [1, 2] and "train.seed" not in grid.fixed
    assert [r["lora.rank"] for r in grid.runs()] == [4, 4] and grid.runs()[0]["method"] == "lora"
    # the search's trials were search trials (validation only); the retrain is the result
    searched = retrain.retrain_grid({**best, "config": {**best["config"], "evaluation.role": "search"}}, [1], "s")
    assert grid_lib.parse_grid(searched, "retrain.yaml").fixed["evaluation.role"] == "result"


def test_the_job_ends_with_one_summary_selection_retrained_test_and_link():
    """The main job's last lines, once: the selected configuration, its retrained test ± std with
    validation beside it, the selection score for what it is, the link to compare trials."""
    best = {"trial_id": "t1", "params": {"train.lr": 0.005}, "config": {"method": "trajectory"},
            "selection": {"metric": "validation/accuracy", "score": 0.7167, "completed_trials": 2}}
    summary = {"metric": "accuracy", "seeds": [1, 2, 3],
               "test/accuracy": {"mean": 0.81, "std": 0.01, "n": 3},
               "validation/accuracy": {"mean": 0.79, "std": 0.02, "n": 3}}
    text = retrain.closing_summary("rs", best, summary, "compare its trials: open http://x/#/runs")
    assert text.strip().splitlines() == [
        "sweep rs: selected configuration (trial t1):",
        "  train.lr = 0.005",
        "  retrained: test/accuracy 0.8100 ± 0.0100 over 3 fresh seed(s) [1, 2, 3] "
        "(validation/accuracy 0.7900 ± 0.0200)",
        "  selection score validation/accuracy 0.7167, the best of 2 completed trials on validation: "
        "optimistic, not a result",
        "compare its trials: open http://x/#/runs"]
    assert "not retrained (--retrain-seeds 0)" in retrain.closing_summary("rs", best, None, "c")
    assert retrain.closing_summary("rs", {}, None, "compare") == "compare"  # no selection: the link alone


def test_summary_is_test_mean_and_std_over_finished_seeds_with_validation_beside():
    df = pd.DataFrame([{"seed": 3, "status": "FINISHED", TEST_METRIC: 0.8, VALIDATION_METRIC: 0.7},
                       {"seed": 4, "status": "FINISHED", TEST_METRIC: 0.9, VALIDATION_METRIC: 0.9},
                       {"seed": 5, "status": "FAILED", TEST_METRIC: math.nan, VALIDATION_METRIC: math.nan}])
    s = retrain.summarise(df)
    assert s["seeds"] == [3, 4] and s["test/accuracy"]["n"] == 2
    assert s["test/accuracy"]["mean"] == pytest.approx(0.85)
    assert s["test/accuracy"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert s["validation/accuracy"]["mean"] == pytest.approx(0.8)
    assert "test/accuracy 0.8500 ± 0.0707 over 2 fresh seed(s) [3, 4]" in retrain.line(s)


def _logged_sweep(uri: str, name: str, seeds: list[int], test: list[float]) -> None:
    """A finished sweep in MLflow as the engine logs it: a parent run and one trial run per seed."""
    from lora_diffusion.engine.tracking import SweepTracker

    tracker = SweepTracker(uri, name)
    tracker.parent_run()
    for seed, acc in zip(seeds, test):
        run = tracker.trial_run(f"{name}-{seed}", params={"train.seed": seed}, tags={"seed": seed})
        tracker.log_final(run, {"test/accuracy": acc, "validation/accuracy": acc - 0.1}, step=4)
        tracker.end_run(run)
    tracker.end_run(tracker.find_runs(role="sweep")[0].info.run_id)


def test_a_finished_retrain_stage_is_read_back_not_trained_again(tmp_path, monkeypatch):
    """A rerun (--resume) after the stage finished: no new sweep, best.json and the search's
    parent run carry the stage's test figures again (the engine rewrote best.json without them)."""
    from mlflow.tracking import MlflowClient

    from lora_diffusion.engine import sweep
    from lora_diffusion.engine.options import build_parser
    from lora_diffusion.engine.storage import SweepStorage

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", SweepStorage(str(tmp_path / "sweeps"))
    _logged_sweep(uri, "s", [0, 1], [0.5, 0.6])
    _logged_sweep(uri, "s-retrain", [2, 3, 4], [0.7, 0.8, 0.9])
    storage.write_text("s/sweep.json", json.dumps({"tracking_uri": uri}))
    storage.write_text("s/best.json", json.dumps({"trial_id": "s-1", "selection": {"score": 0.6},
                                                  "config": {"method": "lora", "train.seed": 1}}))
    storage.write_text("s-retrain/best.json", "{}")
    monkeypatch.setattr(sweep, "main", lambda *a, **k: pytest.fail("the finished stage was run again"))
    args = build_parser("rank_schedule").parse_args(["--name", "s", "--storage-path", str(tmp_path / "sweeps"),
                                                     "--tracking-uri", uri])
    lines = []
    assert retrain.run(args, log=lines.append) == 0
    assert "s-retrain: finished earlier, not run again" in lines
    assert "retrained: test/accuracy 0.8000 ± 0.1000" in lines[-1] and "compare its trials" in lines[-1]
    best = json.loads(storage.read_text("s/best.json"))
    assert best["retrain"]["seeds"] == [2, 3, 4] and best["test/accuracy"]["mean"] == pytest.approx(0.8)
    assert best["test/accuracy"]["std"] == pytest.approx(0.1) and best["selection"]["score"] == 0.6
    [parent] = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("lora-diffusion-sweeps").experiment_id],
        "tags.sweep = 's' and tags.role = 'sweep'")
    assert parent.data.metrics["test/accuracy_mean"] == pytest.approx(0.8)
    assert parent.data.tags["retrain.sweep"] == "s-retrain"
    assert "test/accuracy 0.8000 ± 0.1000" in parent.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_sweep_retrains_its_selection_with_fresh_seeds_once(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    """The main job's path (a search space, Optuna + ASHA, then the retrain): its search trials
    score validation only, the retrain scores test; the job ends with one summary."""
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    space = {"description": "retrain test", "params": {"train.lr": {"type": "categorical", "choices": [1e-3, 3e-3]}},
             "sweep": {"num_samples": 2, "grace_period": 4, "reduction_factor": 2},
             "fixed": {"backbone": str(tiny_backbone_dir), "data_dir": str(synthetic_data_dir), "method": "lora",
                       "max_length": 32, "max_train_examples": 32, "max_eval_examples": 16,
                       "train_accuracy_examples": 8, "train.steps": 4, "train.batch_size": 8,
                       "train.eval_every": 4, "train.warmup_steps": 1, "diffusion.eval_t_points": 1,
                       "diffusion.sampler_steps": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--space", str(tmp_path / "s.yaml"), "--name", "rt",
           "--max-concurrent", "2", "--address", "local", "--storage-path", str(storage),
           "--tracking-uri", uri, "--verbose", "0", "--retrain-seeds", "2"]
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir)}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    # its best seed on validation, logged as an MLflow model from its Train checkpoint (issue 47)
    assert "(best on validation) logged as merged model models:/" in first.stdout, first.stdout[-3000:]
    # one summary at the end (issue 45): no stage's own selection line, one link
    end = first.stdout[first.stdout.index("sweep rt: selected configuration (trial "):].strip().splitlines()
    assert end[-3].startswith("  retrained: test/accuracy ") and "(validation/accuracy " in end[-3]
    assert end[-2].startswith("  selection score validation/accuracy ") and end[-1].startswith("compare its trials:")
    assert "selected trial" not in first.stdout and first.stdout.count("compare its trials") == 1

    best = json.loads((storage / "rt" / "best.json").read_text())
    assert best["selection"]["metric"] == "validation/accuracy" and "validation/accuracy" in best
    assert best["retrain"]["seeds"] == [1, 2]  # the search used seed 0 (2 configurations x 1 seed)
    assert best["test/accuracy"]["n"] == 2 and best["test/accuracy"]["std"] is not None
    assert best["validation/accuracy"]["n"] == 2

    from mlflow.tracking import MlflowClient

    def runs():
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("lora-diffusion-sweeps")
        return client.search_runs([exp.experiment_id], "tags.sweep = 'rt-retrain' and tags.role = 'trial'")

    search = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("lora-diffusion-sweeps").experiment_id],
        "tags.sweep = 'rt' and tags.role = 'sweep'")[0]
    assert search.data.metrics["test/accuracy_mean"] == pytest.approx(best["test/accuracy"]["mean"])
    assert "test/accuracy_std" in search.data.metrics and "selection/validation_accuracy" in search.data.metrics
    assert search.data.tags["retrain.sweep"] == "rt-retrain"
    assert sorted(int(r.data.params["train.seed"]) for r in runs()) == [1, 2]
    # search trials: validation only, no test and no diagnostics; the retrain's: test, per-t
    trials = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("lora-diffusion-sweeps").experiment_id],
        "tags.sweep = 'rt' and tags.role = 'trial'")
    assert len(trials) == 2 and all("final/validation/accuracy" in r.data.metrics for r in trials)
    assert not [k for r in trials for k in r.data.metrics if "test/" in k or "per_t" in k]
    assert all({"final/test/accuracy", "final/validation/per_t/bound_bin0"} <= set(r.data.metrics) for r in runs())

    again = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "rt-retrain: finished earlier, not run again" in again.stdout
    assert "logged as" not in again.stdout  # the model is logged once
    assert len(runs()) == 2  # not trained twice
    assert json.loads((storage / "rt" / "best.json").read_text())["retrain"]["seeds"] == [1, 2]


def test_summary_of_a_generation_task_is_its_own_metric_not_accuracy():
    """XQuAD is selected and reported on F1: the retrain summary, best.json's keys and the
    console line name test/f1, read from final/test/f1."""
    df = pd.DataFrame([{"seed": s, "task": "xquad", "status": "FINISHED", "final/test/f1": test,
                        "final/validation/f1": val} for s, test, val in ((3, 0.4, 0.5), (4, 0.6, 0.7))])
    s = retrain.summarise(df)
    assert s["metric"] == "f1" and "test/accuracy" not in s
    assert s["test/f1"]["mean"] == pytest.approx(0.5) and s["validation/f1"]["mean"] == pytest.approx(0.6)
    assert retrain.line(s).startswith("test/f1 0.5000 ± 0.1414 over 2")
