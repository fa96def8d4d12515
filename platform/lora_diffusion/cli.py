"""`lora-diffusion VERB`: the one front door; every job in jobs/ is one of these verbs.

    train, eval                  one configuration; a checkpoint
    prepare-backbone             an encoder turned into a masked diffusion LM
    sweep, grid                  a search space / an ablation grid on the sweep engine (Ray Tune)
    compare, compare-table       the baseline comparison at a matched budget; its tables
    compose                      multi-task composition of task modules
    soak                         a sweep's driver killed and resumed; its fault matrix
    report                       a sweep's ablation report, rebuilt from MLflow
    bench, bench-report          what the methods cost; the performance table from its JSON
    bench-cluster                the benchmark as a Ray task on a cluster node
    calibrate-injection          where trajectory modules go: placements side by side
    overlap                      each task's split sizes and evaluation-set overlap
    local-cluster                cluster.yaml's one-machine variant (and its loopback sshd)
    export                       a checkpoint (or a sweep's retrained selection) as PEFT, merged or native

Bad input (a config field, a missing file, an unknown backbone) prints one line naming the field
or file and exits with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .core import checkpoint, config as config_lib
from .core.errors import OutOfDeviceMemory, TrainingDiverged, UserError

# per-bin and per-phase figures (`<split>/per_t/bound_bin3`, `<split>/phase_gain/2`): one line
# per series, values in index order, instead of one line per figure
SERIES = re.compile(r"^(.+/per_t/\w+?)_bin(\d+)$|^(.+/phase_gain)/(\d+)$")


def _series(key: str) -> tuple[str, int] | None:
    m = SERIES.match(key)
    return None if m is None else (m.group(1) or m.group(3), int(m.group(2) or m.group(4)))


def _print_result(result: dict) -> None:
    keys = [k for k in result if "/" in k or k.endswith("_s") or k.startswith("peak")]
    series: dict[str, list] = {}
    for k in keys:
        if _series(k) and isinstance(result[k], float):
            name, index = _series(k)
            series.setdefault(name, []).append((index, result[k]))
    for k in keys:
        s, v = _series(k), result[k]
        if s and s[0] in series:
            values = sorted(series.pop(s[0]))
            label = s[0] + f" [{values[0][0]}..{values[-1][0]}]"
            print(f"  {label:28s} " + " ".join(f"{x:.4f}" for _, x in values))
        elif not (s and isinstance(v, float)):
            print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    acc = result.get("accounting")
    if acc:
        print(f"  {'trainable_params':28s} {acc['trainable_params']} "
              f"({acc['percent_of_backbone']:.3f}% of backbone), {acc['bytes_saved']} bytes saved")
        if acc.get("trained_params", acc["trainable_params"]) != acc["trainable_params"]:
            print(f"  {'trained_params':28s} {acc['trained_params']} (through a reparameterisation "
                  f"that is not saved)")


def cmd_train(args) -> int:
    from .core.recipe import Recipe

    sets = (args.set or []) + (["allow_overlap=true"] if args.allow_overlap else [])
    config = config_lib.load(args.config, sets)
    out = Path(args.output_dir or config.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output_dir: {out} is not empty (pass --overwrite to replace it)")
    recipe = Recipe(config)  # loads data, backbone and method: all input errors surface here
    result = recipe.run()
    checkpoint.save(out, recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"checkpoint and result.json in {out}")
    _print_result(result)
    return 0


def cmd_eval(args) -> int:
    from .core import tasks
    from .core.recipe import Recipe

    overrides = config_lib.parse_sets(args.set or [])
    if args.task:
        overrides["task"] = args.task
    if args.data_file:
        if not Path(args.data_file).is_file():
            raise UserError(f"data-file: {args.data_file} not found")
        overrides["test_file"] = args.data_file
    if args.allow_overlap:
        overrides["allow_overlap"] = True
    recipe = Recipe.from_checkpoint(args.checkpoint, overrides)  # refuses overlapping files
    config = recipe.config
    t0 = time.perf_counter()
    result = {} if args.data_file else recipe.evaluate(recipe.validation_examples, "validation")
    result.update(recipe.evaluate(recipe.test_examples, "test"))
    result["test/source"] = args.data_file or f"{config.task} test split"
    result["eval_time_s"] = time.perf_counter() - t0
    result["split_note"] = tasks.get_task(config.task).split_note
    print(json.dumps(result, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from .core.prepare import CORPORA, PrepareSettings, prepare_backbone

    lr = args.lr or (3e-3 if args.mode == "head" else PrepareSettings.lr)
    corpora = tuple(c.strip() for c in args.corpora.split(",") if c.strip()) if args.corpora else CORPORA
    settings = PrepareSettings(
        mode=args.mode, steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
        backbone=args.backbone, max_length=args.max_length, corpora=corpora,
        data_dir=args.data_dir, cache_dir=args.cache_dir, out=args.out,
        checkpoint_every=args.checkpoint_every, eval_texts=args.eval_texts, threads=args.threads)
    result = prepare_backbone(settings, stop_after=args.stop_after, eval_only=args.eval_only,
                              log=lambda line: print(line, flush=True))
    print(json.dumps(result, indent=2))
    return 0


def cmd_report(args) -> int:
    from .analysis.report import parse_reference, write_report

    if args.tracking_uri:
        uri = args.tracking_uri
    else:
        from .engine.options import repo_root
        from .engine.tracking import default_tracking_uri

        uri = default_tracking_uri(repo_root() / "runs")
    axes = [a.strip() for a in args.axes.split(",") if a.strip()] if args.axes else None
    reference = parse_reference(args.reference) or None
    out = Path(args.out or Path("runs") / "reports" / args.sweep)
    files = write_report(uri, args.sweep, axes, reference, out, metric=args.metric)
    print(files["summary"].read_text())
    print(f"{len(files)} files in {out}, logged on the parent run of sweep {args.sweep} under ablation/")
    return 0


def cmd_overlap(args) -> int:
    """The sizes of each task's splits and each evaluation set's overlap with the whole train
    split (the check a run makes before it evaluates, core/overlap.py), timed."""
    from .core import overlap, tasks
    from .core.task_specs import TASKS

    for task in args.task or sorted(TASKS):
        splits = {s: tasks.load_split(task, s, args.data_dir) for s in ("train", "validation", "test")}
        if args.data_file:
            splits[args.data_file] = tasks.load_split(task, "test", data_file=args.data_file)
        train, t0 = splits.pop("train"), time.perf_counter()
        training = overlap.TrainingText(e.text for e in train)
        print(f"{task}: train {len(train)} rows, indexed in {time.perf_counter() - t0:.2f} s")
        for name, examples in splits.items():
            t0 = time.perf_counter()
            n = round(overlap.overlap_fraction(examples, training) * len(examples))
            print(f"  {name}: {len(examples)} rows, {n} overlap training ({n / len(examples):.1%}), "
                  f"checked in {time.perf_counter() - t0:.2f} s")
    return 0


ALLOW_OVERLAP_HELP = ("evaluate even if more than 1%% of an evaluation set's rows overlap the "
                      "training rows (exact or containment); the fraction is reported as "
                      "<split>/overlap (config: allow_overlap)")


def _add_prepare_parser(sub) -> None:
    b = sub.add_parser("prepare-backbone", help="turn an encoder into a masked diffusion LM")
    b.add_argument("--out", help="also make this path a symlink to the prepared (cached) directory")
    b.add_argument("--cache-dir", help="where prepared backbones live, under prepared/ "
                                       "(default $LORA_DIFFUSION_CACHE, else ~/.cache/lora-diffusion)")
    b.add_argument("--backbone", default="minilm")
    b.add_argument("--mode", choices=("head", "full"), default="full")
    b.add_argument("--steps", type=int, default=1200)  # = PrepareSettings.steps
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--max-length", type=int, default=64, help="window length in tokens")
    b.add_argument("--lr", type=float, default=None,
                   help="default 3e-3 for --mode head, 5e-4 for --mode full (measured: head at 1e-4 "
                        "reached only 0.064 held-out masked-token accuracy in 600 steps)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--corpora", help="comma-separated train corpora (default: sst2,ag_news,xquad,xsum)")
    b.add_argument("--data-dir")
    b.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoints; an interrupted run loses at most this many")
    b.add_argument("--eval-texts", type=int, default=200, help="held-out validation texts scored")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    b.add_argument("--stop-after", type=int, help="train at most this many steps now; rerun to continue")
    b.add_argument("--eval-only", action="store_true",
                   help="evaluate the latest checkpoint of this run (or its finished result)")
    b.set_defaults(func=cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-diffusion", description=__doc__,
                                epilog="each verb: lora-diffusion VERB --help",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one configuration")
    t.add_argument("--config", help="YAML/JSON config file (defaults are in config.py)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. trajectory.rank=8")
    t.add_argument("--output-dir", help="checkpoint directory (default: config output_dir)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    t.add_argument("--allow-overlap", action="store_true", help=ALLOW_OVERLAP_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--task", help="task whose format --data-file is in (default: the checkpoint's)")
    e.add_argument("--data-file", help="labelled file in the task's format, reported as split 'test' "
                                       "(default: the task's validation and test splits)")
    e.add_argument("--allow-overlap", action="store_true", help=ALLOW_OVERLAP_HELP)
    e.add_argument("--set", action="append", metavar="KEY=VALUE")
    e.set_defaults(func=cmd_eval)

    _add_prepare_parser(sub)

    r = sub.add_parser("report", help="aggregate a sweep's trials from MLflow: grid table, statistics, plots")
    r.add_argument("--sweep", required=True, help="sweep name (tag sweep= of its MLflow runs)")
    r.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    r.add_argument("--axes", help="comma-separated params, e.g. trajectory.rank,trajectory.rank_schedule "
                                  "(default: the sweep's varying sampled params)")
    r.add_argument("--reference", help="reference cell, key=value,... (paired differences by seed)")
    r.add_argument("--metric", help="the trial metric aggregated (default: the task's own on validation: "
                                    "final/validation/accuracy, final/validation/f1 for xquad, ...rougeL for xsum)")
    r.add_argument("--out", help="output directory (default: runs/reports/SWEEP)")
    r.set_defaults(func=cmd_report)

    o = sub.add_parser("overlap", help="sizes of every task's splits and each evaluation set's overlap "
                                       "with its training rows (core/overlap.py), timed")
    o.add_argument("--task", action="append", help="default: every task")
    o.add_argument("--data-file", help="also check this file (in the task's format)")
    o.add_argument("--data-dir", help="default: $LORA_DIFFUSION_DATA_DIR")
    o.set_defaults(func=cmd_overlap)

    # listed for --help only: `main` hands everything after these verbs to their own parsers
    for name, (text, _) in DELEGATED.items():
        sub.add_parser(name, add_help=False, help=text)
    return p


# ----------------------------------------------------------------------------- verbs with their own parser


def _sweep(argv, prog):
    return sweep_main(argv)


def _grid(argv, prog):
    return sweep_main(argv, default_space="grid_rank_schedule")


def _in(target: str):
    """A verb whose parser lives in its module: `module:function` under lora_diffusion, imported
    when the verb runs (so `lora-diffusion --help` loads neither Ray nor torch)."""
    module, function = target.split(":")

    def run(argv, prog):
        import importlib

        return getattr(importlib.import_module(f"lora_diffusion.{module}"), function)(argv, prog)
    return run


DELEGATED = {
    "sweep": ("Ray Tune + Optuna sweep over a search space, then its selection retrained on test", _sweep),
    "grid": ("an ablation grid (cells x seeds) on the sweep engine, with its report", _grid),
    "compare": ("baselines at a matched parameter budget: tuned on validation, every seed on test",
                _in("experiments.comparison:main")),
    "compare-table": ("the baseline comparison's tables as markdown, from its record and MLflow",
                      _in("analysis.table:main")),
    "compose": ("multi-task composition: task modules trained apart, composed, interference measured",
                _in("experiments.composition.stages:main")),
    "soak": ("a sweep's driver killed at random moments and resumed; its fault matrix", _in("experiments.soak:main")),
    "bench": ("what the methods cost: training, memory, inference, the sweep engine, data-parallel scaling",
              _in("experiments.bench.benchmark:main")),
    "bench-report": ("the README's performance table and plots from a bench JSON",
                     _in("experiments.bench.benchmark:report_main")),
    "gpu-check": ("one LLaDA-8B-shaped training step on one GPU, no Ray/MLflow: precision, checkpointing, MFU",
                  _in("experiments.bench.gpu:main")),
    "plan": ("memory plan of a trial: bytes per worker, fits, GPUs per trial, trials per GPU",
             _in("experiments.plan:main")),
    "results": ("rebuild the reports in docs/results/ from their records (MLflow, JSON)",
                _in("experiments.results:main")),
    "bench-cluster": ("the benchmark as one Ray task on a cluster node (--gpus 1: a GPU node)",
                      _in("experiments.bench.cluster:main")),
    "calibrate-injection": ("where trajectory modules go: accuracy and step time of three placements",
                            _in("experiments.bench.calibrate:main")),
    "export": ("a checkpoint, or a sweep's retrained selection, as a PEFT adapter, merged weights or native",
               _in("experiments.export:main")),
    "local-cluster": ("write cluster.yaml's one-machine variant; --sshd also serves its loopback sshd",
                      _in("engine.local_cluster:main")),
}


def sweep_main(argv: list[str] | None = None, *, default_space: str = "rank_schedule") -> int:
    """The sweep jobs' entry point: the engine runs the sweep, then the analysis layer writes
    its ablation report on the parent run and retrains the selected configuration with fresh
    seeds on test (experiments/retrain.py; the engine itself never imports analysis or experiments)."""
    from .analysis.report import report_sweep
    from .engine.options import build_parser
    from .engine.sweep import main as engine_main
    from .experiments import retrain

    # closing=False: the job's one summary (selection, retrained test, link) comes after the retrain
    rc = engine_main(argv, default_space=default_space, report=report_sweep, closing=False)
    if rc == 2:  # a user error: nothing ran
        return rc
    # the selected configuration, retrained with fresh seeds and reported on test
    return retrain.main_after_sweep(build_parser(default_space).parse_args(argv), rc)


def tracking_uri_option(argv: list[str]) -> str | None:
    """The --tracking-uri a command line gives (`--tracking-uri URI` or `--tracking-uri=URI`)."""
    for i, arg in enumerate(argv):
        if arg == "--tracking-uri" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--tracking-uri="):
            return arg.partition("=")[2]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        uri = tracking_uri_option(argv[1:])
        if uri is not None:  # every verb that takes one, checked as the sweep's preflight does,
            from .engine.preflight import check_tracking_uri  # before it reads, writes or waits

            check_tracking_uri(uri)
        if argv and argv[0] in DELEGATED:
            return DELEGATED[argv[0]][1](argv[1:], f"lora-diffusion {argv[0]}")
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # the input was valid; the run failed: one line, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OutOfDeviceMemory as exc:  # the trial does not fit the device: one line, exit 3
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
