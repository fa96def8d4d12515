"""`lora-diffusion bench` at its smoke size (tiny random model, synthetic rows): the JSON has every
section and variant the README table is built from, every figure is finite and every cost is
positive, the table, plots and MLflow run come from it, the sweep breakdown adds up, and the
scaling section's throughput is taken after the warm-up, its ratios against the right runs (its
Ray Train runs at smoke size: the one slow test here). No timing thresholds: these machines are
shared."""

from __future__ import annotations

import json
import math

import pytest

from lora_diffusion.core.methods import registry
from lora_diffusion.experiments.bench import report as bench_report, scaling as bench_scaling, sweep as bench_sweep
from lora_diffusion.experiments.bench.benchmark import flat_figures, log_to_mlflow, run_benchmark
from lora_diffusion.experiments.bench.train import FLOOR, REFERENCE
from lora_diffusion.experiments.bench.workbench import SIZES


@pytest.fixture(scope="module")
def smoke_result(synthetic_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_benchmark("smoke", ("train", "memory", "infer"), str(synthetic_data_dir), out, log=None)
    return result, out


def test_the_json_holds_every_variant_and_section(smoke_result):
    result, out = smoke_result
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what was written is the result
    assert result["machine_end"]["date"] >= result["machine"]["date"]
    variants = {r["variant"] for r in result["train"]["rows"]}
    methods = set(registry.names()) - {"router", "lora_merge", "trajectory", "lora"}  # compositions; two named variants
    assert methods <= variants
    assert {FLOOR, REFERENCE, "trajectory-last", "trajectory-mid", "trajectory-every", "lora-attn-mlp"} <= variants
    step = result["infer"]["step"]["variants"]
    assert {"base", "lora merged", "lora unmerged", "adapter", "trajectory K=4", "router n=2"} <= set(step)
    assert [g["steps"] for g in result["infer"]["generation"]] == [2, 4]
    assert {r["variant"] for r in result["memory"]["rows"]} == {"trajectory-mid", "lora-attn"}
    assert result["train"]["growth"]["phases"]["x"] == [1, 2, 4]


def assert_finite_and_positive(figures: dict[str, float]) -> None:
    for name, value in figures.items():
        assert math.isfinite(value), name
        if not name.endswith(("exponent", "trainable_params")):  # exponents may be negative, the floor trains nothing
            assert value > 0, name


def test_every_figure_is_finite_and_every_cost_positive(smoke_result):
    result, _ = smoke_result
    figures = flat_figures({k: result[k] for k in ("train", "memory", "infer")})
    assert len(figures) > 100
    assert_finite_and_positive(figures)


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
    assert "load average at the end" in text  # stamped after the last section, not when the run started
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


def test_the_sweep_section_times_the_search_alone():
    """`sweep` retrains the selected configuration after the search by default: a second sweep
    whose trials are not in the search's timings, so its minutes counted as idle wall time."""
    from lora_diffusion.engine.options import build_parser

    args = build_parser("rank_schedule").parse_args(bench_sweep.DEFAULT_ARGS)
    assert args.retrain_seeds == 0 and args.max_concurrent == 2


def test_bench_refuses_an_unknown_section(capsys):
    from lora_diffusion.cli import main

    assert main(["bench", "--sections", "train,gpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: sections: gpu is not one of train, memory, infer, sweep, scaling"]


# ----------------------------------------------------------------------------- scaling


def _report(step: int, train_s: float, tokens: int) -> dict:
    return {"step": step, "timing/train_s": train_s, "timing/train_tokens": tokens,
            "timing/worker_startup_s": 3.0, "timing/setup_s": 2.0}


def test_scaling_throughput_counts_only_the_steps_after_the_warm_up():
    reports = [_report(10, 9.0, 3000), {**_report(2, 5.0, 600), "accounting_json": '{"trainable_params": 64}'},
               _report(6, 7.0, 1800)]  # Ray Train's order is not promised
    out = bench_scaling.measure(reports, batch=4, wall=30.0)
    assert out["measured_steps"] == 8 and out["measured_s"] == pytest.approx(4.0)
    assert out["examples_per_s"] == pytest.approx(4 * 8 / 4.0)  # not 4 * 10 / 9: the warm-up's 5 s are out
    assert out["tokens_per_s"] == pytest.approx(2400 / 4.0)
    assert (out["startup_s"], out["train_s"], out["trainable_params"]) == (5.0, 9.0, 64)
    with pytest.raises(RuntimeError, match="reported 1 time"):
        bench_scaling.measure(reports[:1], batch=4, wall=30.0)


def _scaling(cores: int, two_workers: float = 17.0) -> dict:
    """The smoke size's runs (1x1, 1x2, 2x1) measured over two rounds at made-up throughputs."""
    eps = {"1x1": (10.0, 9.0), "1x2": (14.0, 12.0), "2x1": (two_workers, two_workers)}
    measured = {run: [{**dict.fromkeys(bench_scaling.FIGURES, 1.0), "examples_per_s": e} for e in pair]
                for run, pair in eps.items()}
    return bench_scaling.summarise(SIZES["smoke"], measured, cores)


def test_scaling_ratios_are_to_one_worker_and_to_one_worker_on_the_same_cores():
    rows = {r["run"]: r for r in _scaling(cores=2)["rows"]}
    assert [r["examples_per_s"] for r in rows.values()] == [9.5, 13.0, 17.0]  # medians of the rounds
    assert rows["2x1"]["ratio_to_reference"] == pytest.approx(17 / 9.5)
    assert rows["2x1"]["ratio_same_cores"] == pytest.approx(17 / 13)  # against 1 worker x 2 threads
    assert rows["1x2"]["ratio_same_cores"] == 1.0 and rows["1x2"]["cores_used"] == 2
    assert not any(r["oversubscribed"] for r in rows.values())
    assert [r["oversubscribed"] for r in _scaling(cores=1)["rows"]] == [False, True, True]


def test_scaling_table_and_target_come_from_the_json():
    from lora_diffusion.experiments.bench.benchmark import machine

    result = {"size": "smoke", "settings": {"threads": 1}, "machine": machine()}  # the scaling section alone

    def target(scaling):
        rows = [t for t in bench_report.targets({**result, "scaling": scaling}) if t[0].startswith("2 Train workers")]
        assert len(rows) == 1
        return rows[0]

    assert target(_scaling(cores=2))[2] is True  # 17 / 9.5 = 1.79
    assert target(_scaling(cores=2, two_workers=12.0))[2] is False  # 1.26
    name, measured, holds = target(_scaling(cores=1))
    assert holds is None and measured.startswith("1.79 x") and "machine cores: 1" in measured  # shown, not judged
    text = bench_report.table({**result, "scaling": _scaling(cores=2)})
    assert "| 2x1 | 2 |" in text and "| 2 Train workers >= 1.6 x one worker's throughput | 1.79 x" in text


def test_trial_timing_counts_the_tokens_of_its_own_steps():
    from types import SimpleNamespace

    from lora_diffusion.engine.trial import Timing

    recipe = SimpleNamespace(train_time=4.0, train_tokens=500)  # a resumed run's counters
    timing = Timing()
    timing.begin(0.0, 1.0, recipe)
    recipe.train_time, recipe.train_tokens = 6.5, 1300
    figures = timing.figures(recipe)
    assert (figures["timing/train_s"], figures["timing/train_tokens"]) == (2.5, 800)


@pytest.mark.slow
def test_scaling_section_fits_its_train_runs_through_ray_at_smoke_size(synthetic_data_dir, tmp_path):
    """1x1, 1x2 and 2x1 Ray Train runs of the tiny model: every figure finite and positive."""
    out = tmp_path / "bench.json"
    result = run_benchmark("smoke", ("scaling",), str(synthetic_data_dir), out, log=None)
    assert json.loads(out.read_text())["scaling"] == json.loads(json.dumps(result["scaling"]))
    sc = result["scaling"]
    assert [r["run"] for r in sc["rows"]] == ["1x1", "1x2", "2x1"] and sc["reference"] == "1x1"
    assert all(r["rounds"] == 1 and r["trainable_params"] > 0 for r in sc["rows"])
    assert_finite_and_positive(flat_figures(sc))
    assert not list((tmp_path / "scaling" / "train").iterdir())  # the runs' checkpoints removed once read
