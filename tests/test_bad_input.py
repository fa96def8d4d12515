"""The bad-input corpus: malformed command lines, configs, search spaces, grids, data files,
checkpoints, storage and tracking locations, cluster addresses and names. Each one, run through
`cli.main` in this process, must exit 2 with one line naming the field, file or value (argparse's
own errors: its usage, then one `error:` line), before Ray starts (ray.init would fail the test),
and leave nothing behind: no sweep directory, no MLflow store, no output directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lora_diffusion.cli import main

ARGPARSE = "argparse"  # the case is argparse's to refuse: usage lines, then `prog: error: ...`


def _files(root: Path) -> dict[str, str]:
    """Every file under root with its content digest: what a case must leave unchanged."""
    return {str(p.relative_to(root)): f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_backbone_dir, synthetic_data_dir):
    """The bad files the cases point at, written once."""
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "syntax.yaml").write_text("params:\n  train.lr: {type: float, low: 1\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "empty.yaml").write_text("")
    (d / "unknown_key.yaml").write_text("train:\n  stepz: 3\n")
    (d / "wrong_type.yaml").write_text("train:\n  batch_size: many\n")
    (d / "grid_syntax.yaml").write_text("grid:\n  trajectory.rank: [2, 4\n")
    (d / "grid_empty_axis.yaml").write_text("grid:\n  trajectory.rank: []\nseeds: [0]\n")
    (d / "grid_dup_seeds.yaml").write_text("grid:\n  trajectory.rank: [2, 4]\nseeds: [0, 0]\n")
    (d / "space_low_high.yaml").write_text("params:\n  train.lr: {type: loguniform, low: 0.1, high: 0.01}\n")
    (d / "space_log_zero.yaml").write_text("params:\n  train.lr: {type: loguniform, low: 0, high: 0.01}\n")
    (d / "space_orphan.yaml").write_text(
        "params:\n  trajectory.min_rank: {type: int, low: 1, high: 4, when: {trajectory.rank_schedule: linear}}\n")
    (d / "space_method.yaml").write_text("params:\n  method: {type: categorical, choices: [lora, lorra]}\n")
    (d / "grid_rank_too_wide.yaml").write_text("grid:\n  trajectory.rank: [4, 64]\nseeds: [0]\n")
    (d / "grid_solo_blocks.yaml").write_text(
        "fixed:\n  method: solo\n  solo.to_block: 5\ngrid:\n  solo.rank: [2, 4]\nseeds: [0]\n")
    (d / "grid_ref_not_a_value.yaml").write_text(
        "grid:\n  trajectory.rank: [2, 4]\nreference: {trajectory.rank: 8}\nseeds: [0]\n")
    (d / "grid_ref_not_a_cell.yaml").write_text(
        "cells:\n  - {trajectory.rank: 2, trajectory.num_phases: 1}\n"
        "  - {trajectory.rank: 4, trajectory.num_phases: 2}\n"
        "reference: {trajectory.rank: 2, trajectory.num_phases: 2}\nseeds: [0]\n")
    (d / "binary.tsv").write_bytes(b"\xff\xfe\x00" * 200)
    (d / "empty.tsv").write_text("")
    (d / "wrong_columns.tsv").write_text("text\tstars\nfine film\t1\n")
    (d / "no_label.tsv").write_text("sentence\tlabel\nfine film\t\n")
    _checkpoints(d, tiny_backbone_dir, synthetic_data_dir)
    return d


def _checkpoints(d: Path, backbone: Path, data: Path) -> None:
    """A real checkpoint, then broken copies of it: empty, garbage JSON, truncated weights,
    a foreign config, tensor shapes that do not match the config."""
    import shutil

    from lora_diffusion.core import checkpoint, config as config_lib
    from lora_diffusion.core.recipe import Recipe

    config = config_lib.from_dict({}, {"backbone": str(backbone), "data_dir": str(data), "max_length": 32,
                                       "trajectory.injection_layers": [0], "trajectory.rank": 4,
                                       "max_train_examples": 16, "max_eval_examples": 8})
    recipe = Recipe(config)
    good = checkpoint.save(d / "ckpt_good", recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    (d / "ckpt_empty").mkdir()
    for name in ("ckpt_json", "ckpt_truncated", "ckpt_foreign", "ckpt_shapes"):
        shutil.copytree(good, d / name)
    (d / "ckpt_json" / "config.json").write_text("{not json")
    weights = d / "ckpt_truncated" / "method.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    (d / "ckpt_foreign" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    cfg = json.loads((d / "ckpt_shapes" / "config.json").read_text())
    cfg["trajectory"]["rank"] = 8  # the saved tensors are rank 4
    (d / "ckpt_shapes" / "config.json").write_text(json.dumps(cfg))


def _train(*sets, config=None):
    args = ["train", "--output-dir", "{out}"] + (["--config", config] if config else [])
    for s in ("backbone={backbone}", "data_dir={data}", "train.steps=1", "max_train_examples=16",
              "max_eval_examples=8", "trajectory.injection_layers=[0]", *sets):
        args += ["--set", s]
    return args


def _sweep(*extra, space=None):
    args = ["sweep", "--smoke", "--address", "local", "--storage-path", "{sweeps}",
            "--tracking-uri", "{tracking}", "--set", "backbone={backbone}", *extra]
    return args + (["--space", space] if space else [])


# (id, argv, what the error line must name)
CASES = [
    # -- command lines
    ("subcommand misspelled", ["trian"], ARGPARSE),
    ("train flag misspelled", ["train", "--outptu-dir", "x"], ARGPARSE),
    ("sweep flag misspelled", _sweep("--nmu-samples", "2"), ARGPARSE),
    ("set without =", _train("train.steps"), "--set expects key=value"),
    ("set unknown key", _train("train.stepz=3"), "train.stepz"),
    ("set unknown section", _train("bogus.key=1"), "bogus"),
    ("set wrong type", _train("train.lr=fast"), "train.lr"),
    ("set float steps", _train("train.steps=1.5"), "train.steps"),
    # -- non-positive or absurd values
    ("zero steps", _train("train.steps=0"), "train.steps"),
    ("zero batch size", _train("train.batch_size=0"), "train.batch_size"),
    ("zero eval_every", _train("train.eval_every=0"), "train.eval_every"),
    ("zero rank", _train("trajectory.rank=0"), "trajectory.rank"),
    ("negative rank", _train("trajectory.rank=-3"), "trajectory.rank"),
    ("rank above hidden size", _train("trajectory.rank=33"), "trajectory.rank"),
    ("r_min > r_max", _train("trajectory.rank_schedule=linear", "trajectory.rank=4", "trajectory.min_rank=8"),
     "trajectory.min_rank"),
    ("zero phases", _train("trajectory.num_phases=0"), "trajectory.num_phases"),
    ("negative grad clip", _train("train.grad_clip=-1"), "train.grad_clip"),
    ("negative warm-up", _train("train.warmup_steps=-5"), "train.warmup_steps"),
    ("infinite lr", _train("train.lr=.inf"), "train.lr"),
    ("nan lr", _train("train.lr=.nan"), "train.lr"),
    ("lr above 1", _train("train.lr=10"), "train.lr"),
    ("zero lr", _train("train.lr=0"), "train.lr"),
    ("negative weight decay", _train("train.weight_decay=-0.1"), "train.weight_decay"),
    ("zero threads", _train("train.threads=0"), "train.threads"),
    ("precision misspelled", _train("train.precision=bf16_mixed"), "train.precision"),
    ("micro-batch above the batch", _train("train.batch_size=8", "train.micro_batch_size=16"),
     "train.micro_batch_size"),
    ("zero micro-batch", _train("train.micro_batch_size=0"), "train.micro_batch_size"),
    ("zero logits chunk", _train("train.logits_chunk_rows=0"), "train.logits_chunk_rows"),
    ("zero evaluation batch", _train("evaluation.batch_size=0"), "evaluation.batch_size"),
    ("checkpointing as a word", _train("train.gradient_checkpointing=yes please"), "train.gradient_checkpointing"),
    ("zero train examples", _train("max_train_examples=0"), "max_train_examples"),
    ("zero sampler steps", _train("diffusion.sampler_steps=0"), "diffusion.sampler_steps"),
    ("t_min of 1", _train("diffusion.t_min=1"), "diffusion.t_min"),
    ("max_length beyond positions", _train("max_length=100000"), "max_length"),
    ("method misspelled", _train("method=lorra"), "method"),
    ("unknown task", _train("task=imdb"), "task"),
    # -- config files
    ("config binary", _train(config="{corpus}/binary.yaml"), "binary.yaml"),
    ("config YAML syntax", _train(config="{corpus}/syntax.yaml"), "syntax.yaml"),
    ("config not a mapping", _train(config="{corpus}/list.yaml"), "list.yaml"),
    ("config unknown key", _train(config="{corpus}/unknown_key.yaml"), "train.stepz"),
    ("config wrong type", _train(config="{corpus}/wrong_type.yaml"), "train.batch_size"),
    ("config missing", _train(config="{corpus}/absent.yaml"), "absent.yaml"),
    # -- data files
    ("data dir missing", _train("data_dir=/no/such/dir"), "/no/such/dir"),
    ("test file missing", _train("test_file=/no/such/file.tsv"), "/no/such/file.tsv"),
    ("test file binary", _train("test_file={corpus}/binary.tsv"), "binary.tsv"),
    ("test file empty", _train("test_file={corpus}/empty.tsv"), "empty.tsv"),
    ("test file wrong columns", _train("test_file={corpus}/wrong_columns.tsv"), "wrong_columns.tsv"),
    ("test file rows without labels", _train("test_file={corpus}/no_label.tsv"), "no_label.tsv"),
    ("backbone missing", _train("backbone=/no/such/model"), "/no/such/model"),
    # -- checkpoints
    ("checkpoint missing", ["eval", "--checkpoint", "{corpus}/ckpt_absent"], "ckpt_absent"),
    ("checkpoint empty", ["eval", "--checkpoint", "{corpus}/ckpt_empty"], "ckpt_empty"),
    ("checkpoint config not JSON", ["eval", "--checkpoint", "{corpus}/ckpt_json"], "ckpt_json/config.json"),
    ("checkpoint truncated", ["eval", "--checkpoint", "{corpus}/ckpt_truncated"], "method.safetensors"),
    ("checkpoint foreign", ["eval", "--checkpoint", "{corpus}/ckpt_foreign"], "ckpt_foreign/config.json"),
    ("checkpoint shapes", ["eval", "--checkpoint", "{corpus}/ckpt_shapes"], "ckpt_shapes"),
    # -- prepare-backbone
    ("prepare zero steps", ["prepare-backbone", "--steps", "0", "--out", "{out}"], "field steps"),
    ("prepare zero batch", ["prepare-backbone", "--batch-size", "0", "--out", "{out}"], "field batch_size"),
    # -- search spaces and grids
    ("space binary", _sweep(space="{corpus}/binary.yaml"), "binary.yaml"),
    ("space YAML syntax", _sweep(space="{corpus}/syntax.yaml"), "syntax.yaml"),
    ("space empty", _sweep(space="{corpus}/empty.yaml"), "empty.yaml"),
    ("space missing", _sweep(space="{corpus}/absent.yaml"), "absent.yaml"),
    ("space low > high", _sweep(space="{corpus}/space_low_high.yaml"), "train.lr"),
    ("space log over zero", _sweep(space="{corpus}/space_log_zero.yaml"), "train.lr"),
    ("space condition on missing parent", _sweep(space="{corpus}/space_orphan.yaml"), "trajectory.min_rank"),
    ("space method misspelled", _sweep(space="{corpus}/space_method.yaml"), "lorra"),
    ("grid YAML syntax", _sweep(space="{corpus}/grid_syntax.yaml"), "grid_syntax.yaml"),
    ("grid empty axis", _sweep(space="{corpus}/grid_empty_axis.yaml"), "grid.trajectory.rank"),
    ("grid duplicate seeds", _sweep(space="{corpus}/grid_dup_seeds.yaml"), "seeds"),
    # -- sweep options
    ("sweep set on a sampled knob", _sweep("--set", "trajectory.rank=8"), "--set trajectory.rank"),
    ("sweep unknown task", _sweep("--set", "task=imdb"), "task"),
    ("sweep negative grad clip", _sweep("--set", "train.grad_clip=-1"), "train.grad_clip"),
    ("sweep max_length beyond positions", _sweep("--set", "max_length=100000"), "max_length"),
    ("sweep zero samples", _sweep("--num-samples", "0"), "--num-samples"),
    ("sweep zero workers", _sweep("--workers", "0"), "--workers"),
    ("sweep zero concurrency", _sweep("--max-concurrent", "0"), "--max-concurrent"),
    ("sweep negative max failures", _sweep("--max-failures", "-1"), "--max-failures"),
    ("sweep negative trial retries", _sweep("--retry-failed", "-1"), "--retry-failed"),
    ("sweep worker resource without amount", _sweep("--worker-resources", "spot"), "--worker-resources"),
    ("sweep worker resource CPU", _sweep("--worker-resources", "CPU=1"), "--worker-resources"),
    ("sweep name with a slash", _sweep("--name", "a/b"), "--name"),
    ("sweep name ..", _sweep("--name", ".."), "--name"),
    ("sweep name with a space", _sweep("--name", "a b"), "--name"),
    ("resume of no sweep", _sweep("--name", "never-ran", "--resume"), "never-ran"),
    ("storage without bucket", _sweep("--storage-path", "s3:///sweeps"), "no bucket"),
    ("storage bare scheme", _sweep("--storage-path", "s3://"), "no bucket"),
    ("storage unknown scheme", _sweep("--storage-path", "nosuchfs://bucket/x"), "--storage-path"),
    ("tracking unknown scheme", _sweep("--tracking-uri", "htp://host"), "--tracking-uri"),
    ("tracking unreachable", _sweep("--tracking-uri", "http://127.0.0.1:9"), "127.0.0.1:9"),
    ("tracking sqlite relative", _sweep("--tracking-uri", "sqlite:relative.db"), "--tracking-uri"),
    ("ray address unreachable", _sweep("--address", "127.0.0.1:9"), "127.0.0.1:9"),
    ("ray address malformed", _sweep("--address", "not-an-address"), "--address"),
    # -- every verb that takes a tracking URI checks it as the sweep's preflight does (issue 46)
    ("report tracking unreachable", ["report", "--sweep", "s", "--tracking-uri", "http://127.0.0.1:9"],
     "127.0.0.1:9"),
    ("compare-table tracking unreachable", ["compare-table", "--tracking-uri=http://127.0.0.1:9"], "127.0.0.1:9"),
    ("results tracking unknown scheme", ["results", "--tracking-uri", "htp://host"], "--tracking-uri"),
    # -- every config value that depends on the backbone, against its config.json before Ray
    ("sweep injection layer beyond the backbone", _sweep("--set", "trajectory.injection_layers=[5]"),
     "trajectory.injection_layers"),
    ("grid rank above the hidden size", _sweep(space="{corpus}/grid_rank_too_wide.yaml"), "trajectory.rank"),
    ("grid solo block beyond the backbone", _sweep(space="{corpus}/grid_solo_blocks.yaml"), "solo.to_block"),
    # -- a grid's reference is a cell of the grid that runs (after --smoke rewrote it)
    ("smoke grid reference not an axis value", _sweep(space="{corpus}/grid_ref_not_a_value.yaml"),
     "reference.trajectory.rank"),
    ("smoke grid reference not a cell", _sweep(space="{corpus}/grid_ref_not_a_cell.yaml"), "reference"),
    # -- every job's seed list, checked where it is parsed
    ("compare repeated seeds", ["compare", "--smoke", "--seeds", "0", "0", "--workdir", "{out}"], "--seeds"),
    ("compose repeated seeds", ["compose", "--smoke", "--seeds", "1", "1", "--workdir", "{out}"], "--seeds"),
    ("gpus without a GPU", _sweep("--gpus-per-worker", "1"), "--gpus-per-worker"),
    ("negative gpus", _sweep("--gpus-per-worker", "-1"), "--gpus-per-worker"),
]


@pytest.mark.parametrize("argv, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, named, corpus, tiny_backbone_dir,
                                                            synthetic_data_dir, tmp_path, capsys, monkeypatch):
    if "--gpus-per-worker" in argv and argv[argv.index("--gpus-per-worker") + 1] == "1":
        import torch

        if torch.cuda.device_count():
            pytest.skip("this machine has a GPU")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr("lora_diffusion.engine.tuner.init_ray", no_ray)
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    values = {"out": work / "out", "sweeps": work / "sweeps", "tracking": f"sqlite:///{work}/mlflow/m.db",
              "backbone": tiny_backbone_dir, "data": synthetic_data_dir, "corpus": corpus}
    argv = [a.format(**values) for a in argv]
    before = _files(corpus)
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    elapsed = time.perf_counter() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert err, "no error message"
    if named == ARGPARSE:
        assert "error:" in err[-1], err
    else:
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not list(work.iterdir()), f"left behind: {os.listdir(work)}"
    assert _files(corpus) == before  # nothing overwritten
    assert elapsed < 10, f"{elapsed:.1f} s"  # seconds (2 s unloaded); never a cluster start


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60
