"""Bad input: one line naming the field or file, exit code 2, nothing written."""

import subprocess
import sys

import pytest

from lora_diffusion.cli import main


@pytest.fixture
def run_cli(tiny_backbone_dir, synthetic_data_dir, tmp_path, capsys):
    def run(*sets):
        out = tmp_path / "out"
        base = [f"backbone={tiny_backbone_dir}", f"data_dir={synthetic_data_dir}", "trajectory.injection_layers=[0]",
                "train.steps=1", "max_train_examples=16", "max_eval_examples=8"]
        args = ["train", "--output-dir", str(out)]
        for s in base + list(sets):
            args += ["--set", s]
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        return code, err, out
    return run


@pytest.mark.parametrize("setting, named", [
    ("trajectory.rank_schedule=zigzag", "trajectory.rank_schedule"),
    ("trajectory.rank=0", "trajectory.rank"),
    ("trajectory.rank=-3", "trajectory.rank"),
    ("trajectory.rank=33", "trajectory.rank"),  # the tiny backbone's hidden size is 32
    ("trajectory.phase_boundaries=[0, 0.5, 0.9]", "trajectory.phase_boundaries"),
    ("trajectory.phase_boundaries=[0.1, 0.5, 1.0]", "trajectory.phase_boundaries"),
    ("trajectory.injection_layers=[7]", "trajectory.injection_layers"),
    ("diffusion.noise_schedule=quadratic", "diffusion.noise_schedule"),
    ("train.lr=fast", "train.lr"),
    ("trajectory.bogus=1", "trajectory.bogus"),
    ("backbone=/no/such/model", "/no/such/model"),
    ("test_file=/no/such/file.tsv", "/no/such/file.tsv"),
    ("data_dir=/no/such/dir", "/no/such/dir"),
    ("task=imdb", "task"),
])
def test_bad_input_names_the_field_exits_2_and_writes_nothing(run_cli, setting, named):
    code, err, out = run_cli(setting)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not out.exists()


def test_missing_column_names_the_file_and_column(run_cli, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tstars\nfine film\t1\n")
    code, err, out = run_cli(f"test_file={bad}")
    assert code == 2 and "bad.tsv" in err[0] and "label" in err[0]
    assert not out.exists()


def test_console_script_exits_2_on_bad_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_diffusion.cli", "train", "--config",
                           str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: config file not found: {tmp_path / 'missing.yaml'}"]


def test_printed_result_puts_each_per_bin_series_on_one_line_in_index_order(capsys):
    from lora_diffusion.cli import _print_result
    result = {"validation/per_t/bound_bin1": 2.0, "validation/per_t/bound_bin0": 1.0,
              "validation/per_t/backbone_bound_bin0": 5.0, "validation/per_t/backbone_bound_bin1": 6.0,
              "test/phase_gain_metric": "accuracy", "test/phase_gain/0": 0.25, "test/phase_gain/1": -0.5,
              "test/f1": 0.125}
    _print_result(result)
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["validation/per_t/bound", "[0..1]", "1.0000", "2.0000"] in lines
    assert ["validation/per_t/backbone_bound", "[0..1]", "5.0000", "6.0000"] in lines
    assert ["test/phase_gain", "[0..1]", "0.2500", "-0.5000"] in lines
    assert ["test/phase_gain_metric", "accuracy"] in lines and ["test/f1", "0.1250"] in lines
    assert len(lines) == 5


def _verbs() -> list[str]:
    from lora_diffusion.cli import build_parser

    (subparsers,) = [a for a in build_parser()._actions if a.dest == "command"]
    return list(subparsers.choices)


def test_every_verb_answers_help_with_exit_0_and_a_text(capsys):
    verbs = _verbs()
    assert {"train", "sweep", "grid", "compare", "compose", "soak", "bench", "overlap"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "usage:" in out and len(out.splitlines()) > 3, verb
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(verb in listing for verb in verbs)


def test_every_job_is_a_thin_wrapper_of_a_verb():
    """jobs/*.py stay what `ray submit` copies: a docstring, and main([verb, ...] + sys.argv[1:])."""
    import ast
    from pathlib import Path

    verbs = set(_verbs())
    jobs = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py"))
    assert len(jobs) >= 10
    for job in jobs:
        tree = ast.parse(job.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], job.name
        (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "main"]
        first = call.args[0].elts[0]
        assert isinstance(first, ast.Constant) and first.value in verbs, job.name
        assert isinstance(call.args[0].elts[-1], ast.Starred), job.name  # the job's own arguments follow


def test_a_delegated_verb_prints_bad_input_as_one_line_and_exits_2(capsys):
    assert main(["compare", "--trials-per-method", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --trials-per-method: must be >= 1, got 0"]
