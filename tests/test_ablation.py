"""Ablation grids from MLflow: statistics by hand, failed cells kept, resume-invariance, report files."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from lora_diffusion.analysis.report import write_report
from lora_diffusion.analysis.statistics import aggregate, phase_gain_table
from lora_diffusion.analysis.trials import load_trials
from lora_diffusion.core import config as config_lib
from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import grid as grid_lib
from lora_diffusion.engine.tracking import SweepTracker

REPO = Path(__file__).resolve().parents[1]
AXES = ["trajectory.rank", "trajectory.rank_schedule"]
RANKS, SCHEDULES, SEEDS = [4, 8], ["constant", "reversed"], [0, 1]
# final validation / test accuracy per (rank, schedule, seed); (8, reversed, seed 1) fails
DEV = {(4, "constant", 0): 0.61, (4, "constant", 1): 0.65, (4, "reversed", 0): 0.64, (4, "reversed", 1): 0.71,
       (8, "constant", 0): 0.70, (8, "constant", 1): 0.69, (8, "reversed", 0): 0.75}
TEST = {k: v - 0.02 for k, v in DEV.items()}
FAILED = (8, "reversed", 1)
T_975_DF1 = 12.706204736174705  # t distribution, 97.5% quantile, 1 degree of freedom


def _trials():
    return [(r, s, seed) for r in RANKS for s in SCHEDULES for seed in SEEDS]


def _log_trial(tracker: SweepTracker, cell, finish: bool = True) -> None:
    rank, sched, seed = cell
    sampled = {"trajectory.rank": rank, "trajectory.rank_schedule": sched}
    flat = config_lib.from_dict({}, {**sampled, "train.seed": seed}).flat()
    flat.update({f"sampled.{k}": v for k, v in sampled.items()})
    tid = f"t_{rank}_{sched}_{seed}"
    run = tracker.trial_run(tid, params=flat, tags={"method": "trajectory", "seed": seed, "task": "sst2"})
    tracker.log_step(run, {"train/loss": 1.0, "validation/accuracy": 0.5, "train/reg_nuclear": 99.0}, 5)
    tracker.log_step(run, {"train/loss": 1.0, "validation/accuracy": 0.5, "train/reg_nuclear": rank + seed}, 10)
    if not finish:
        return
    if cell == FAILED:
        tracker.end_run(run, "FAILED")
        return
    params = rank * 100 + (1 if sched == "reversed" else 0)
    tracker.log_final(run, {"validation/accuracy": DEV[cell], "test/accuracy": TEST[cell], "train/loss": 0.9,
                            "accounting": {"trainable_params": params, "bytes_saved": params * 4 + 64}}, 20)
    tracker.end_run(run, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store, two sweeps of the same grid: `whole` logged in one go, `resumed` in two
    batches by two trackers (a driver restart), its interrupted trial re-attached and finished."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    whole = SweepTracker(uri, "whole", sweep_id="whole-0001")
    whole.parent_run()
    for cell in _trials():
        _log_trial(whole, cell)
    first = SweepTracker(uri, "resumed", sweep_id="resumed-0001")
    first.parent_run()
    trials = _trials()
    for cell in trials[:3]:
        _log_trial(first, cell)
    _log_trial(first, trials[3], finish=False)  # interrupted while running
    second = SweepTracker(uri, "resumed", sweep_id="resumed-0001")
    for cell in trials[3:]:
        _log_trial(second, cell)
    return uri


def _hand(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975_DF1 * std / math.sqrt(n)  # n = 2 here
    return mean, std, mean - half, mean + half


def test_load_trials_reads_every_trial_including_the_failed_one(store):
    df = load_trials(store, "whole")
    assert len(df) == 8 and df["trial_id"].is_unique
    assert sorted(df["status"].value_counts().items()) == [("FAILED", 1), ("FINISHED", 7)]
    row = df[df["trial_id"] == "t_4_reversed_1"].iloc[0]
    assert row["seed"] == 1 and row["trajectory.rank"] == 4 and row["trajectory.rank_schedule"] == "reversed"
    assert row["final/validation/accuracy"] == pytest.approx(0.71)
    assert row["final/test/accuracy"] == pytest.approx(0.69)
    assert row["trainable_params"] == 401 and row["bytes_saved"] == 401 * 4 + 64
    assert row["train.lr"] == pytest.approx(3e-3)  # every resolved config param is a column
    assert math.isnan(df[df["status"] == "FAILED"].iloc[0]["final/validation/accuracy"])


def test_aggregate_matches_hand_computation(store):
    df = load_trials(store, "whole")
    ref = {"trajectory.rank": 4, "trajectory.rank_schedule": "constant"}
    table = aggregate(df, AXES, ref)
    assert len(table) == 4  # the failed cell is kept
    cells = {(int(r["trajectory.rank"]), r["trajectory.rank_schedule"]): r for _, r in table.iterrows()}

    c = cells[(4, "reversed")]
    vals = [DEV[(4, "reversed", s)] for s in SEEDS]
    mean, std, lo, hi = _hand(vals)
    assert (c["n"], c["n_failed"]) == (2, 0)
    assert c["mean"] == pytest.approx(mean) and c["std"] == pytest.approx(std)
    assert c["ci95_low"] == pytest.approx(lo) and c["ci95_high"] == pytest.approx(hi)
    assert c["test_accuracy"] == pytest.approx(mean - 0.02)
    assert c["validation_accuracy"] == pytest.approx(mean)
    assert c["trainable_params"] == 401 and c["accounting_consistent"]
    assert c["reg_nuclear"] == pytest.approx(4.5)  # the last logged penalty (4 + seed), mean over seeds
    # paired by seed against (4, constant): d_s = x_s - ref_s; t = mean(d) / (sd(d) / sqrt 2);
    # with 1 degree of freedom (Cauchy) the two-sided p = 1 - 2 atan(|t|) / pi
    d = [DEV[(4, "reversed", s)] - DEV[(4, "constant", s)] for s in SEEDS]
    dm = sum(d) / 2
    sd = math.sqrt(sum((x - dm) ** 2 for x in d))
    t = dm / (sd / math.sqrt(2))
    assert c["n_pairs"] == 2 and c["diff_mean"] == pytest.approx(dm)
    assert c["p_value"] == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi)

    failed = cells[(8, "reversed")]
    assert (failed["n"], failed["n_failed"], failed["n_pairs"]) == (1, 1, 1)
    assert failed["mean"] == pytest.approx(0.75) and math.isnan(failed["std"])
    assert math.isnan(failed["ci95_low"]) and math.isnan(failed["p_value"])  # < 2 pairs
    assert failed["diff_mean"] == pytest.approx(0.75 - 0.61)  # seed 0 only
    assert failed["reg_nuclear"] == pytest.approx(8.0)  # the failed seed's penalty does not count
    refrow = cells[(4, "constant")]
    assert refrow["is_reference"] and refrow["diff_mean"] == 0 and math.isnan(refrow["p_value"])


def test_partial_reference_compares_within_each_slice(store):
    df = load_trials(store, "whole")
    table = aggregate(df, AXES, {"trajectory.rank_schedule": "constant"})
    r8 = table[(table["trajectory.rank"] == 8) & (table["trajectory.rank_schedule"] == "reversed")].iloc[0]
    assert r8["diff_mean"] == pytest.approx(0.75 - 0.70)  # against (8, constant), seed 0


def test_resumed_grid_gives_the_same_table(store):
    ref = {"trajectory.rank": 4, "trajectory.rank_schedule": "constant"}
    resumed = load_trials(store, "resumed")
    assert len(resumed) == 8 and (resumed["n_runs"] == 1).all()  # re-attached, not duplicated
    a = aggregate(load_trials(store, "whole"), AXES, ref)
    b = aggregate(resumed, AXES, ref)
    pd.testing.assert_frame_equal(a, b)


def test_aggregate_rejects_unknown_axis_and_reference(store):
    df = load_trials(store, "whole")
    with pytest.raises(UserError, match="trajectory.rnak"):
        aggregate(df, ["trajectory.rnak"], None)
    with pytest.raises(UserError, match="reference"):
        aggregate(df, AXES, {"trajectory.rank": 16})


def test_write_report_files_and_parent_artifacts(store, tmp_path):
    files = write_report(store, "whole", AXES, {"trajectory.rank": 4, "trajectory.rank_schedule":
                                                         "constant"}, tmp_path / "report")
    for key in ("trials", "grid", "pareto", "summary", f"heatmap_{AXES[0]}__{AXES[1]}"):
        assert files[key].is_file() and files[key].stat().st_size > 0, key
    grid = pd.read_parquet(files["grid"])
    assert len(grid) == 4 and grid["n_failed"].sum() == 1
    assert len(pd.read_parquet(files["trials"])) == 8
    summary = files["summary"].read_text()
    assert "n_failed" in summary and "1 failed" in summary
    assert "reg_nuclear" in summary and "reg_*: what each regulariser penalises" in summary
    assert any(k.startswith("optuna_") for k in files)  # sampled.* params: an Optuna sweep

    tracker = SweepTracker(store, "whole", sweep_id="whole-0001")
    parent = tracker.parent_run()
    logged = {f.path for f in tracker.client.list_artifacts(parent, "ablation")}
    assert {"ablation/grid.json", "ablation/grid.parquet", "ablation/trials.parquet", "ablation/pareto.png",
            "ablation/summary.md", f"ablation/heatmap_{AXES[0]}__{AXES[1]}.png"} <= logged


def test_cli_report_bad_axis_exits_2(store, tmp_path, capsys):
    from lora_diffusion.cli import main

    rc = main(["report", "--sweep", "whole", "--tracking-uri", store, "--axes", "trajectory.nope",
               "--out", str(tmp_path / "r")])
    assert rc == 2 and "trajectory.nope" in capsys.readouterr().err
    rc = main(["report", "--sweep", "no-such-sweep", "--tracking-uri", store])
    assert rc == 2


def test_grid_files_are_valid():
    files = sorted((REPO / "search_spaces").glob("grid_*.yaml"))
    assert len(files) >= 6
    for path in files:
        grid = grid_lib.load_grid(path)
        assert grid.cells() and len(grid.seeds) >= 2, path
    rs = grid_lib.load_grid(REPO / "search_spaces" / "grid_rank_schedule.yaml")
    assert "reversed" in rs.axes["trajectory.rank_schedule"]


def test_grid_file_bad_key_names_file_and_key(tmp_path):
    bad = tmp_path / "grid_bad.yaml"
    bad.write_text("grid:\n  trajectory.rnak: [4, 8]\nseeds: [0, 1]\n")
    with pytest.raises(UserError, match=r"grid_bad\.yaml: grid\.trajectory\.rnak"):
        grid_lib.load_grid(bad)
    bad.write_text("grid:\n  trajectory.rank: [4, 0]\nseeds: [0, 1]\n")
    with pytest.raises(UserError, match=r"grid_bad\.yaml: grid\.trajectory\.rank.*must be >= 1"):
        grid_lib.load_grid(bad)
    bad.write_text("grid:\n  trajectory.rank: [4, 8]\nseeds: [0, 1]\nreference: {trajectory.rank: 16}\n")
    with pytest.raises(UserError, match=r"grid_bad\.yaml: reference\.trajectory\.rank"):
        grid_lib.load_grid(bad)
    bad.write_text("grids:\n  trajectory.rank: [4]\n")
    with pytest.raises(UserError, match=r"grid_bad\.yaml: grids: unknown key"):
        grid_lib.load_grid(bad)


def test_a_grid_extends_another_merging_fixed_and_replacing_the_rest(tmp_path):
    (tmp_path / "grid_base.yaml").write_text(
        "description: base\nfixed: {method: trajectory, train.steps: 3}\n"
        "grid:\n  trajectory.rank: [4, 8]\nseeds: [0, 1]\nsweep: {max_concurrent: 2, workers: 1}\n")
    (tmp_path / "grid_mid.yaml").write_text("extends: grid_base\nfixed: {train.steps: 5}\nsweep: {workers: 2}\n")
    (tmp_path / "grid_leaf.yaml").write_text(
        "extends: grid_mid.yaml\ndescription: leaf\ncells:\n  - {trajectory.rank: 2}\n  - {trajectory.rank: 6}\n"
        "axes: [trajectory.rank]\nseeds: [3, 4]\n")
    mid = grid_lib.load_grid(tmp_path / "grid_mid.yaml")
    assert mid.name == "grid_mid" and mid.description == "base"
    assert mid.fixed == {"method": "trajectory", "train.steps": 5} and mid.sweep == {"max_concurrent": 2, "workers": 2}
    assert mid.axes == {"trajectory.rank": [4, 8]} and mid.seeds == [0, 1]
    leaf = grid_lib.load_grid(tmp_path / "grid_leaf.yaml")  # `cells` replaces the parent's `grid`
    assert [c["trajectory.rank"] for c in leaf.cells()] == [2, 6] and leaf.seeds == [3, 4]
    assert leaf.description == "leaf" and leaf.fixed["train.steps"] == 5


def test_a_missing_or_circular_parent_is_one_error_naming_the_file(tmp_path):
    child = tmp_path / "grid_child.yaml"
    child.write_text("extends: grid_nowhere\nfixed: {task: xsum}\n")
    with pytest.raises(UserError, match=r"grid_child\.yaml: extends: no grid file .*grid_nowhere\.yaml"):
        grid_lib.load_grid(child)
    child.write_text("extends: [grid_a]\n")
    with pytest.raises(UserError, match=r"grid_child\.yaml: extends: expected the name of a grid file"):
        grid_lib.load_grid(child)
    (tmp_path / "grid_a.yaml").write_text("extends: grid_b\n")
    (tmp_path / "grid_b.yaml").write_text("extends: grid_a\n")
    circle = r"grid_b\.yaml: extends: circular \(grid_a\.yaml -> grid_b\.yaml -> grid_a\.yaml\)"
    with pytest.raises(UserError, match=circle):
        grid_lib.load_grid(tmp_path / "grid_a.yaml")
    (tmp_path / "grid_self.yaml").write_text("extends: grid_self\n")
    with pytest.raises(UserError, match=r"grid_self\.yaml: extends: circular"):
        grid_lib.load_grid(tmp_path / "grid_self.yaml")


def test_aggregate_flags_accounting_mismatch_and_running_seeds():
    rows = [{"trial_id": f"t{i}", "status": st, "seed": seed, "a": "x", "final/validation/accuracy": acc,
             "final/test/accuracy": acc, "trainable_params": tp, "bytes_saved": 10}
            for i, (st, seed, acc, tp) in enumerate([("FINISHED", 0, 0.5, 100), ("FINISHED", 1, 0.7, 101),
                                                     ("RUNNING", 2, math.nan, math.nan),
                                                     ("FAILED", 3, math.nan, math.nan),
                                                     ("FAILED", 1, math.nan, math.nan)])]  # seed 1 retried ok
    row = aggregate(pd.DataFrame(rows), ["a"]).iloc[0]
    assert (row["n"], row["n_running"], row["n_failed"]) == (2, 1, 1)
    assert row["trainable_params"] == 100 and not row["accounting_consistent"]
    assert row["mean"] == pytest.approx(0.6) and row["seeds"] == "0,1"


def test_aggregate_defaults_to_the_tasks_metric_and_refuses_mixed_metrics():
    """A generation sweep is aggregated on its own figure (XSum: rougeL) with test beside it;
    a frame mixing an accuracy task with an F1 task has no common column and is refused."""
    from lora_diffusion.analysis.trials import task_metric

    rows = [{"trial_id": f"t{s}", "run_id": f"r{s}", "status": "FINISHED", "seed": s, "task": "xsum",
             "method": "trajectory", "final/validation/rougeL": 0.2 + s / 10, "final/test/rougeL": 0.1 + s / 10,
             "trainable_params": 10, "bytes_saved": 40, "trained_params": 10} for s in (0, 1)]
    table = aggregate(pd.DataFrame(rows), ["method"])
    assert table.attrs["metric"] == "final/validation/rougeL"
    assert table.iloc[0]["validation_rougeL"] == pytest.approx(0.25)
    assert table.iloc[0]["test_rougeL"] == pytest.approx(0.15)
    with pytest.raises(UserError, match="different metrics"):
        task_metric(pd.DataFrame([{"task": "sst2"}, {"task": "xquad"}]))


def test_phase_gain_table_is_mean_and_std_per_phase_over_finished_seeds():
    """Per cell with K > 1, each phase's test gain over the newest finished run of each seed; a
    failed rerun and a K = 1 cell (no gains logged) do not count."""
    def row(i, k, seed, status, gains):
        return {"trial_id": f"t{i}", "status": status, "seed": seed, "trajectory.num_phases": k,
                **{f"final/test/phase_gain/{p}": g for p, g in enumerate(gains)}}

    df = pd.DataFrame([row(0, 2, 0, "FINISHED", [0.1, 0.3]), row(1, 2, 1, "FINISHED", [0.2, 0.5]),
                       row(2, 2, 1, "FAILED", [9.0, 9.0]), row(3, 1, 0, "FINISHED", [])])
    table = phase_gain_table(df, ["trajectory.num_phases"])
    assert table["trajectory.num_phases"].tolist() == [2]  # K = 1 logged no gain: no row
    # phase 0: mean 0.15, std sqrt(0.005) = 0.0707; phase 1: mean 0.4, std 0.1414
    assert table.iloc[0]["phase 0"] == "0.1500 ± 0.0707" and table.iloc[0]["phase 1"] == "0.4000 ± 0.1414"
    assert phase_gain_table(df.drop(columns=[c for c in df if "phase_gain" in c]), ["trajectory.num_phases"]) is None
