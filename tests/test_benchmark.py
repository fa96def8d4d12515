"""`lora-diffusion bench` at its smoke size (tiny random model, synthetic rows): the JSON has every
section and variant the README table is built from, every figure is finite and every cost is
positive, the table, plots and MLflow run come from it, and the sweep breakdown adds up. No timing
thresholds: these machines are shared."""

from __future__ import annotations

import json
import math

import pytest

from lora_diffusion.analysis import bench_report, bench_sweep
from lora_diffusion.analysis.bench_train import FLOOR, REFERENCE
from lora_diffusion.analysis.benchmark import flat_figures, log_to_mlflow, run_benchmark
from lora_diffusion.core.methods import registry


@pytest.fixture(scope="module")
def smoke_result(synthetic_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_benchmark("smoke", ("train", "memory", "infer"), str(synthetic_data_dir), out, log=None)
    return result, out


def test_the_json_holds_every_variant_and_section(smoke_result):
    result, out = smoke_result
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what was written is the result
    variants = {r["variant"] for r in result["train"]["rows"]}
    methods = set(registry.names()) - {"router", "lora_merge", "trajectory", "lora"}  # compositions; two named variants
    assert methods <= variants
    assert {FLOOR, REFERENCE, "trajectory-last", "trajectory-mid", "trajectory-every", "lora-attn-mlp"} <= variants
    step = result["infer"]["step"]["variants"]
    assert {"base", "lora merged", "lora unmerged", "adapter", "trajectory K=4", "router n=2"} <= set(step)
    assert [g["steps"] for g in result["infer"]["generation"]] == [2, 4]
    assert {r["variant"] for r in result["memory"]["rows"]} == {"trajectory-mid", "lora-attn"}
    assert result["train"]["growth"]["phases"]["x"] == [1, 2, 4]


def test_every_figure_is_finite_and_every_cost_positive(smoke_result):
    result, _ = smoke_result
    figures = flat_figures({k: result[k] for k in ("train", "memory", "infer")})
    assert len(figures) > 100
    for name, value in figures.items():
        assert math.isfinite(value), name
        if not name.endswith(("exponent", "trainable_params")):  # exponents may be negative, the floor trains nothing
            assert value > 0, name


def test_table_plots_and_mlflow_run_come_from_the_json(smoke_result, tmp_path):
    result, out = smoke_result
    plots = bench_report.write_plots(result, tmp_path / "docs")
    assert {p.name for p in plots} == {"bench-sequence.png", "bench-train-growth.png", "bench-inference-growth.png"}
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n")
    bench_report.replace_section(readme, bench_report.table(result, str(tmp_path / "docs"), tmp_path))
    bench_report.replace_section(readme, bench_report.table(result, str(tmp_path / "docs"), tmp_path))
    text = readme.read_text()
    assert text.count(bench_report.BEGIN) == 1 and "before" in text  # replaced, not appended twice
    assert "| trajectory-mid |" in text and "| router n=2 |" in text and "![sequence](docs/bench-sequence.png)" in text
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(log_to_mlflow(result, uri, [out, *plots]))
    assert run.data.params["size"] == "smoke" and len(run.data.metrics) > 100


def test_sweep_breakdown_adds_up_to_the_slots():
    trials = [{"trial_id": str(i), "steps": 100, "stopped_early": i == 1, "trial_started_at": 10.0 + 50 * i,
               "reported_at": 60.0 + 50 * i, "worker_startup_s": 5.0, "setup_s": 5.0, "train_s": 30.0,
               "eval_s": 6.0, "checkpoint_s": 2.0, "report_s": 2.0} for i in range(2)]
    out = bench_sweep.breakdown(trials, wall=120.0, t0=0.0, concurrency=2)
    assert sum(out["slot_s"].values()) == pytest.approx(240.0)
    assert out["wall_over_train"] == pytest.approx(120 / 30)
    assert out["startup_share_of_300_steps"] == pytest.approx(10 / (300 * 0.3))


def test_bench_refuses_an_unknown_section(capsys):
    from lora_diffusion.cli import main

    assert main(["bench", "--sections", "train,gpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: sections: gpu is not one of train, memory, infer, sweep"]
