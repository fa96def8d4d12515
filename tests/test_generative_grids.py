"""The generative sweeps and grids (XQuAD-en, XSum on the prepared CPU diffusion LM): every file
loads and builds valid configs, selects on its task's metric, spends the parameters it says; a
sweep whose backbone directory is missing stops before Ray with one line naming it."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from lora_diffusion.core import config as config_lib
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.methods.trajectory import phase_boundaries, rank_schedule
from lora_diffusion.engine import preflight, search_space as ss
from lora_diffusion.engine.grid import load_grid
from lora_diffusion.engine.spec import selection_metric

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"
PREPARED = "runs/backbones/minilm-mdlm"
METRIC = {"xquad": "validation/f1", "xsum": "validation/rougeL"}
QUESTIONS = ("rank_schedule", "sharing", "regularizers", "methods", "noise_aware")
GRIDS = [f"grid_{task}_{q}" for task in METRIC for q in QUESTIONS]
BUDGET = 73_728  # the comparison's budget: 96 rank units x 2 x 384 at one injection layer


def _check_generative(fixed: dict, description: str, task: str) -> None:
    assert fixed["task"] == task and fixed["backbone"] == PREPARED
    assert fixed["max_length"] == 256 and fixed["max_eval_examples"] == 64
    assert selection_metric(task) == METRIC[task]
    assert PREPARED in description and "prepare-backbone" in description


@pytest.mark.parametrize("task", sorted(METRIC))
def test_main_job_spaces_sample_valid_configs_and_select_on_the_task_metric(task):
    space = ss.load(SPACES / f"rank_schedule_{task}.yaml")
    _check_generative(space.fixed, space.description, task)
    rng = random.Random(0)
    for _ in range(20):
        config = ss.resolve(space, space.sample(rng))
        assert config.task == task and config.method == "trajectory"
    schedules = next(p for p in space.params if p.key == "trajectory.rank_schedule").choices
    assert set(schedules) == {"constant", "linear", "cosine", "step", "reversed"}


@pytest.mark.parametrize("name", GRIDS)
def test_grids_build_valid_configs_with_three_seeds_and_one_reference_cell(name):
    grid = load_grid(SPACES / f"{name}.yaml")  # every cell x seed built as a Config
    task = name.split("_")[1]
    _check_generative(grid.fixed, grid.description, task)
    assert grid.seeds == [0, 1, 2]
    runs = [config_lib.from_dict({}, run) for run in grid.runs()]
    assert {c.task for c in runs} == {task}
    reference = [c for c in grid.cells() if all(c.get(k) == v for k, v in grid.reference.items())]
    assert len(reference) == 1, reference


@pytest.mark.parametrize("task", sorted(METRIC))
def test_rank_schedule_grid_spends_the_same_parameters_in_every_cell(task):
    """Every schedule x K cell has rank units summing to 96 (73,728 parameters), so K > 1 and
    every schedule are compared with constant rank at K = 1 at equal parameters."""
    grid = load_grid(SPACES / f"grid_{task}_rank_schedule.yaml")
    seen = set()
    for run in grid.runs():
        tc = config_lib.from_dict({}, run).trajectory
        ranks = rank_schedule(tc, phase_boundaries(tc, sampler_steps=16))
        assert sum(ranks) * 2 * 384 * len(tc.injection_layers) == BUDGET, (run, ranks)
        seen.add((tc.rank_schedule, tc.num_phases))
    assert {k for _, k in seen} == {1, 2, 4, 8}
    assert {s for s, k in seen if k in (4, 8)} == {"constant", "linear", "cosine", "step", "reversed"}


def _minilm_shaped_backbone():
    """MiniLM's architecture (the prepared backbone's) with a small vocabulary and random
    weights: what the methods attach to and count is the same, and it builds in a blink."""
    from transformers import AutoConfig, AutoTokenizer, BertForMaskedLM

    from lora_diffusion.core.backbone import Backbone, resolve_backbone

    source = resolve_backbone("minilm")
    config = AutoConfig.from_pretrained(source)
    config.vocab_size = 1024  # above the mask id; the methods never touch the embeddings
    return Backbone(model=BertForMaskedLM(config), tokenizer=AutoTokenizer.from_pretrained(source),
                    source=source)


def test_method_grids_meet_the_budget_on_minilm():
    """Each method's size knob, counted by the accounting on MiniLM's shapes, lands within budget
    matching's 10% of the comparison's budget; both tasks run the same cells."""
    from lora_diffusion.experiments.budget import count_params

    grids = {task: load_grid(SPACES / f"grid_{task}_methods.yaml") for task in METRIC}
    assert grids["xquad"].cells() == grids["xsum"].cells()
    backbone, fixed = _minilm_shaped_backbone(), grids["xquad"].fixed
    counts = {cell["method"]: count_params(config_lib.from_dict({}, {**fixed, **cell, "backbone": "minilm"}),
                                           backbone) for cell in grids["xquad"].cells()}
    assert set(counts) == {"trajectory", "lora", "tlora", "adapter", "trajectory_adapter"}
    assert all(abs(n - BUDGET) <= 0.10 * BUDGET for n in counts.values()), counts


# ----------------------------------------------------------------------------- the backbone preflight


def test_missing_backbone_directory_is_one_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as exc:
        preflight.check_backbone(PREPARED, allow_hub=False)
    msg = str(exc.value)
    assert PREPARED in msg and str(tmp_path / PREPARED) in msg and "prepare-backbone" in msg
    (tmp_path / PREPARED).mkdir(parents=True)  # a directory that is not a model
    with pytest.raises(UserError, match="no config.json"):
        preflight.check_backbone(PREPARED, allow_hub=False)


def test_backbone_directory_is_given_to_trials_as_an_absolute_path(tmp_path, monkeypatch, tiny_backbone_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / PREPARED).parent.mkdir(parents=True)
    (tmp_path / PREPARED).symlink_to(tiny_backbone_dir)  # as prepare-backbone --out makes it
    assert preflight.check_backbone(PREPARED, allow_hub=False) == str(tmp_path / PREPARED)  # still the link
    assert preflight.check_backbone("minilm", allow_hub=False) == "minilm"  # packaged: resolved per node
    assert preflight.check_backbone("org/model", allow_hub=True) == "org/model"  # a hub id


def _sweep_args(tmp_path, *extra) -> list[str]:
    return ["--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--address", "local", *extra]


def test_sweep_without_the_prepared_backbone_stops_before_ray(tmp_path, monkeypatch, capsys, synthetic_data_dir):
    import ray

    from lora_diffusion.engine import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    assert sweep.main(["--space", "rank_schedule_xsum", *_sweep_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and PREPARED in err and "prepare-backbone" in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_sweep_spec_carries_the_absolute_backbone_and_smoke_fits_xsum(tmp_path, monkeypatch, synthetic_data_dir,
                                                                      tiny_backbone_dir):
    from lora_diffusion.engine.options import build_parser
    from lora_diffusion.engine.spec import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    (tmp_path / PREPARED).parent.mkdir(parents=True)
    (tmp_path / PREPARED).symlink_to(tiny_backbone_dir)
    args = build_parser("rank_schedule").parse_args(
        ["--grid", "grid_xquad_sharing", "--set", "max_length=64", *_sweep_args(tmp_path),
         # the stand-in is 2 layers, 32 wide: the grid's rank 38 and the default injection layer 2
         # are refused before Ray (issue 46)
         "--set", "trajectory.rank=16", "--set", "trajectory.min_rank=4", "--set", "trajectory.injection_layers=[0]"])
    spec = prepare(args)  # the tiny model has 128 positions: max_length 64 fits
    assert spec.fixed["backbone"] == spec.base_overrides["backbone"] == str(tmp_path / PREPARED)
    assert spec.metric == "validation/f1" and spec.sweep.num_samples == 9
    spec.parse_space()  # what --resume validates again
    smoke = prepare(build_parser("rank_schedule").parse_args(
        ["--space", "rank_schedule_xsum", "--smoke", *_sweep_args(tmp_path)]))
    config = config_lib.from_dict({}, smoke.fixed)
    assert smoke.metric == "validation/rougeL" and config.backbone == "tiny-random"
    assert config.generation.response_tokens <= config.max_length - 3


def test_only_runs_a_slice_of_the_rank_schedule_grid_keeping_the_reference_and_resumes_it(
        tmp_path, monkeypatch, synthetic_data_dir):
    """--only trajectory.num_phases=1,4: the K = 1 reference and the five K = 4 cells, x 3 seeds, as
    a sweep named after the slice; --resume with the same command finds it and keeps its cells."""
    from lora_diffusion.engine.options import build_parser
    from lora_diffusion.engine.spec import SPEC_FILE, prepare
    from lora_diffusion.engine.storage import SweepStorage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    argv = ["--grid", "grid_xquad_rank_schedule", "--smoke", "--only", "trajectory.num_phases=1,4",
            *_sweep_args(tmp_path)]
    spec = prepare(build_parser("rank_schedule").parse_args(argv))
    assert spec.name == "grid_xquad_rank_schedule-num_phases-1-4-smoke"
    phases = [(c["trajectory.rank_schedule"], c["trajectory.num_phases"]) for c in spec.grid.cells]
    assert phases == [("constant", 1)] + [(s, 4) for s in ("constant", "linear", "cosine", "step", "reversed")]
    assert spec.grid.axes["trajectory.num_phases"] == [1, 4] and spec.sweep.num_samples == 6 * 2  # smoke: 2 seeds
    assert spec.grid.only == {"trajectory.num_phases": [1, 4]}
    SweepStorage(str(tmp_path / "sweeps")).write_text(f"{spec.name}/{SPEC_FILE}", spec.to_json())
    resumed = prepare(build_parser("rank_schedule").parse_args([*argv, "--resume"]))
    assert resumed.sweep_id == spec.sweep_id and resumed.grid.cells == spec.grid.cells


@pytest.mark.parametrize("only, problem", [
    ("trajectory.num_phases=4", "leaves out the reference cell"),
    ("trajectory.num_phases=3", "3 is not one of its values"),
    ("trajectory.rank=96", "not an axis"),
    ("trajectory.num_phases", "expects axis=value"),
])
def test_a_bad_slice_is_one_error_naming_only(only, problem, tmp_path, monkeypatch, capsys, synthetic_data_dir):
    import ray

    from lora_diffusion.engine import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    argv = ["--grid", "grid_xquad_rank_schedule", "--smoke", "--only", only, *_sweep_args(tmp_path)]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(f"--only.*{problem}", err), err
    assert not ray.is_initialized() and not (tmp_path / "sweeps").exists()


def test_a_grid_whose_cells_all_name_a_task_is_checked_on_those_tasks_only(synthetic_data_dir):
    """The comparison's grids put the task in every cell and none in `fixed` (whose default is
    sst2): one generative task is one metric, and is accepted; cells of two metrics are refused."""
    from lora_diffusion.engine.spec import GridSpec, _check_data

    fixed = config_lib.from_dict({}, {"data_dir": str(synthetic_data_dir)})
    assert fixed.task == "sst2"

    def grid(*task_names):
        return GridSpec(axes={}, seeds=[0], reference={}, cells=[{"task": t} for t in task_names])

    _check_data(fixed, grid("xquad", "xquad"))
    _check_data(fixed, None)
    with pytest.raises(UserError, match="different metrics"):
        _check_data(fixed, grid("xquad", "sst2"))
    with pytest.raises(UserError, match="different metrics"):  # a cell without a task runs sst2
        _check_data(fixed, GridSpec(axes={}, seeds=[0], reference={}, cells=[{"task": "xquad"}, {}]))


def test_a_sweep_of_generative_cells_selects_on_their_metric_not_on_fixeds_default():
    """Tune's metric follows the runs' task: a comparison's XQuAD cells (no task in `fixed`)
    are selected on validation/f1; Tune refused their results when it expected accuracy."""
    from dataclasses import fields

    from lora_diffusion.engine.spec import GridSpec, SweepSpec, run_tasks

    spec = SweepSpec(**{f.name: None for f in fields(SweepSpec)})
    spec.fixed = {"train.steps": 4}
    spec.grid = GridSpec(axes={}, seeds=[0], reference={},
                         cells=[{"task": "xquad", "method": m} for m in ("lora", "trajectory")])
    assert spec.metric == "validation/f1"
    spec.grid = GridSpec(axes={"task": ["xsum"]}, seeds=[0], reference={}, cells=None)
    assert spec.metric == "validation/rougeL"
    spec.grid, spec.fixed = None, {"task": "xquad"}
    assert spec.metric == "validation/f1"
    assert run_tasks("sst2", GridSpec(axes={"lora.rank": [2]}, seeds=[0], reference={}, cells=None)) == {"sst2"}


@pytest.mark.parametrize("question", QUESTIONS)
def test_each_xsum_grid_extends_its_xquad_twin_and_states_only_what_differs(question):
    """The XSum file holds `extends`, its description and `fixed.task`; the rest is the twin's."""
    from lora_diffusion.core.config import read_yaml

    raw = read_yaml(SPACES / f"grid_xsum_{question}.yaml", "grid file")
    assert raw == {"extends": f"grid_xquad_{question}", "description": raw["description"],
                   "fixed": {"task": "xsum"}}
    xsum, xquad = (load_grid(SPACES / f"grid_{t}_{question}.yaml") for t in ("xsum", "xquad"))
    assert xsum.fixed == {**xquad.fixed, "task": "xsum"} and xsum.name == f"grid_xsum_{question}"
    assert (xsum.cells(), xsum.seeds, xsum.reference, xsum.sweep) == (
        xquad.cells(), xquad.seeds, xquad.reference, xquad.sweep)


def test_grid_files_hold_no_dated_measurements():
    """Measurements live in the reports (README, docs/results); a grid file keeps cost estimates."""
    dated = [f"{p.name}:{i}" for p in sorted(SPACES.glob("*.yaml"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, dated


def test_a_sweep_of_an_extending_grid_runs_the_merged_grid(tmp_path, monkeypatch, synthetic_data_dir):
    """The engine reads `extends` too: the sweep is named after the child and its saved spec
    holds the merged grid, so --resume needs no parent."""
    from lora_diffusion.engine.options import build_parser
    from lora_diffusion.engine.spec import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    args = build_parser("grid_rank_schedule").parse_args(
        ["--grid", str(SPACES / "grid_xsum_sharing.yaml"), "--smoke", "--set", "generation.text_scores=false",
         "--set", "trajectory.rank=16", "--set", "trajectory.min_rank=4",  # the tiny backbone is 32 wide
         "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    spec = prepare(args)
    assert spec.name == "grid_xsum_sharing-smoke" and spec.fixed["task"] == "xsum"
    assert "extends" not in spec.space_yaml and spec.space_yaml["fixed"]["task"] == "xsum"
    assert spec.parse_space().fixed["task"] == "xsum"
