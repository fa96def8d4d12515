"""A sweep's follow-up stage: its selected configuration retrained with fresh seeds, reported on test.

The search chose its configuration on validation, so its best validation score is optimistic
(the selection score). This stage runs the selected configuration again as a one-cell grid sweep
`<name>-retrain` on the engine (Ray, MLflow, resumable like every sweep) with `n` seeds the search
never used, and reports test mean ± std over them, with validation beside it, in the search's
`best.json`, on its MLflow parent run (metrics, tags linking the two parent runs, description)
and on the console. A finished retrain stage is not run again: a rerun only re-reads it.

The stage's best seed on validation is then logged as an MLflow model (engine/model_registry.py)
on its trial's run, once, and registered under the search's name with `--register` (a rerun
with --register registers the model logged before).
"""

from __future__ import annotations

import json
import math
import sys

from ..analysis.trials import SEED_FIELD, final_column, load_trials, mlflow_client, task_metric
from ..core.task_specs import metric_mode
from ..engine.spec import ROLE, SPEC_FILE

DEFAULT_SEEDS, SMOKE_SEEDS = 3, 1
# the search's options that the retrain stage runs under too (where and how, not what)
FORWARDED = ("storage_path", "tracking_uri", "address", "max_concurrent", "workers", "experiment",
             "cpus_per_worker", "gpus_per_worker", "gpu_memory_gib", "max_failures", "verbose")
NOTE_MARK = "\n\n**Retrained with fresh seeds**"
MODEL_TAG, REGISTERED_TAG = "model.uri", "model.registered"  # on the stage's parent run


def fresh_seeds(used, n: int) -> list[int]:
    """`n` seeds the search never used: the integers after its largest."""
    start = max((int(s) for s in used), default=-1) + 1
    return list(range(start, start + n))


def retrain_grid(best: dict, seeds: list[int], search: str) -> dict:
    """The stage's grid file: the selected configuration as one cell x the fresh seeds."""
    config = {k: v for k, v in best["config"].items() if k != SEED_FIELD}
    config[ROLE] = "result"  # the search's trials scored validation only; this stage is the result
    method = config.pop("method")
    return {"description": f"retrain of sweep {search}'s selected configuration (trial "
                           f"{best['trial_id']}) with fresh seeds, reported on test",
            "fixed": config, "cells": [{"method": method}], "axes": ["method"], "seeds": seeds}


def summarise(df) -> dict:
    """Test and validation of the task's metric (`test/accuracy`, `test/f1`, the ELBO bound
    `test/elbo_nats_per_token` for ELBO-only generation trials: trials.task_metric) over the
    stage's FINISHED trials: mean, std (ddof=1), n, values (None where undefined: best.json
    stays valid JSON); `metric` names the figure."""
    done = df[df["status"] == "FINISHED"] if len(df) else df
    metric = task_metric(df)
    out = {"metric": metric, "seeds": sorted(int(s) for s in done["seed"]) if len(done) else []}
    for split in ("test", "validation"):
        col = final_column(split, metric)
        values = [float(v) for v in done[col]] if len(done) and col in done else []
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        out[f"{split}/{metric}"] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return out


def _figures(summary: dict) -> tuple[str, str]:
    """The summary's test and validation keys: `test/<metric>`, `validation/<metric>`."""
    return f"test/{summary['metric']}", f"validation/{summary['metric']}"


def line(summary: dict) -> str:
    def fmt(k):
        s = summary[k]
        return f"{s['mean']:.4f} ± {s['std']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f} (n=1, no std)"
    test, validation = _figures(summary)
    better = "" if metric_mode(test) == "max" else " (lower is better)"
    return (f"{test}{better} {fmt(test)} over {summary[test]['n']} fresh seed(s) "
            f"{summary['seeds']} ({validation} {fmt(validation)})")


def run(args, log=print) -> int:
    """After `lora-diffusion sweep` (cli.sweep_main): retrain the selected configuration of the
    sweep `args` named, unless --retrain-seeds 0 or it has no selection (interrupted, nothing
    completed), then print the job's one closing summary. Returns the stage's exit code."""
    from ..engine import options
    from ..engine.spec import sweep_name
    from ..engine.storage import SweepStorage

    n = args.retrain_seeds if args.retrain_seeds is not None else (SMOKE_SEEDS if args.smoke else DEFAULT_SEEDS)
    name = sweep_name(args)
    storage = SweepStorage(options.storage_location(args.storage_path))
    if not storage.exists(f"{name}/{SPEC_FILE}"):  # the sweep never started: nothing to sum up
        return 0
    best = json.loads(storage.read_kept(f"{name}/best.json")) if storage.exists(f"{name}/best.json") else {}
    uri = args.tracking_uri or json.loads(storage.read_kept(f"{name}/{SPEC_FILE}"))["tracking_uri"]
    rc, summary = 0, None
    if n >= 1 and best.get("config"):
        rc, summary = _retrain(args, storage, uri, name, best, n, log)
    log(closing_summary(name, best, summary, _compare_line(uri, name)))
    return rc


def _retrain(args, storage, uri: str, name: str, best: dict, n: int, log) -> tuple[int, dict]:
    """The stage run (or read back when it finished earlier), recorded, its model logged:
    (exit code, `summarise` of its trials)."""
    from ..engine import sweep

    stage = f"{name}-retrain"
    if storage.exists(f"{stage}/best.json"):
        log(f"{stage}: finished earlier, not run again")
        rc = 0
    else:
        seeds = fresh_seeds(load_trials(uri, name)["seed"].dropna(), n)
        # closing=False: the stage selects nothing; the job's summary comes after it, once
        rc = sweep.main(_stage_argv(args, stage, retrain_grid(best, seeds, name),
                                    resume=storage.exists(f"{stage}/{SPEC_FILE}")), closing=False)
    summary = summarise(load_trials(uri, stage))
    if summary[_figures(summary)[0]]["n"]:
        _record(storage, uri, name, stage, best, summary)
        log_selected_model(storage, uri, name, stage, getattr(args, "register", False), log)
    return rc, summary


def closing_summary(name: str, best: dict, summary: dict | None, compare: str) -> str:
    """The main job's end, printed once: the selected configuration, its retrained test mean ±
    std with validation beside it (or why there is none), the selection score for what it is,
    and the line to compare the trials. Without a selection (interrupted, every trial failed:
    said above it), the compare line alone."""
    if not best.get("config"):
        return compare
    sel = best.get("selection", {})
    lines = [f"\nsweep {name}: selected configuration (trial {best.get('trial_id')}):"]
    lines += [f"  {k} = {v}" for k, v in best.get("params", {}).items()]
    if summary is None:
        lines.append("  not retrained (--retrain-seeds 0): no test figure")
    elif summary[_figures(summary)[0]]["n"]:
        lines.append("  retrained: " + line(summary))
    else:
        lines.append(f"  retrained: no seed finished (sweep {name}-retrain); --resume tries again")
    completed = f", the best of {sel['completed_trials']} completed trials" if "completed_trials" in sel else ""
    lines.append(f"  selection score {sel.get('metric', 'on validation')} {sel.get('score', math.nan):.4f}"
                 f"{completed} on validation: optimistic, not a result")
    return "\n".join([*lines, compare])


def _compare_line(uri: str, name: str) -> str:
    """The search's link to compare its trials (its parent run's saved runs view)."""
    from ..analysis.trials import find_parent
    from ..core.errors import UserError
    from ..engine.tracking import RUNS_VIEW_TAG, compare_line

    try:
        link = find_parent(uri, name).data.tags.get(RUNS_VIEW_TAG, "")
    except UserError:  # no parent run: the sweep failed before it logged one
        link = ""
    return compare_line(uri, link)


def _stage_argv(args, stage: str, grid: dict, resume: bool) -> list[str]:
    """`lora-diffusion sweep` arguments of the stage: its grid file (a new stage; sweep.json
    keeps its content) or --resume, and the search's own options of where and how it ran."""
    import tempfile
    from pathlib import Path

    import yaml

    argv = ["--name", stage]
    if resume:
        argv.append("--resume")
    else:
        path = Path(tempfile.mkdtemp(prefix="retrain-")) / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        argv += ["--grid", str(path)]
    for key in FORWARDED:
        value = getattr(args, key, None)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    for item in getattr(args, "worker_resources", None) or []:  # the node type the search's workers ran on
        argv += ["--worker-resources", item]
    return argv


def _record(storage, uri: str, name: str, stage: str, best: dict, summary: dict) -> None:
    """best.json, the search's parent run (metrics, tags, description) and the stage's parent
    run (tags linking back), all saying test = the retrain, validation beside it."""
    from ..analysis.trials import find_parent

    best["retrain"] = {"sweep": stage, **summary}
    for key in _figures(summary):
        best[key] = {k: summary[key][k] for k in ("mean", "std", "n")}
    storage.write_kept(f"{name}/best.json", json.dumps(best, indent=2, default=str))
    client = mlflow_client(uri)
    search_run, stage_run = find_parent(uri, name).info.run_id, find_parent(uri, stage).info.run_id
    metrics = {f"{k}_{stat}": summary[k][stat] for k in _figures(summary)
               for stat in ("mean", "std", "n") if summary[k][stat] is not None}
    for key, value in metrics.items():
        client.log_metric(search_run, key, float(value))
    for key, value in {"retrain.sweep": stage, "retrain.run_id": stage_run,
                       "retrain.seeds": ",".join(map(str, summary["seeds"]))}.items():
        client.set_tag(search_run, key, value)
    for key, value in {"stage": "retrain", "retrain.of": name, "retrain.of_run_id": search_run}.items():
        client.set_tag(stage_run, key, value)
    note = client.get_run(search_run).data.tags.get("mlflow.note.content", "").split(NOTE_MARK)[0]
    client.set_tag(search_run, "mlflow.note.content", note + NOTE_MARK + f" (sweep `{stage}`): " + line(summary)
                   + f". Selection score (validation, best of the search): {best['selection']['score']:.4f}.\n")


def log_selected_model(storage, uri: str, name: str, stage: str, register: bool, log=print) -> None:
    """The stage's best seed (validation) as an MLflow model on its trial's run, linked to its
    final metrics, once; registered as `name` when `register` (also a model logged before)."""
    from ..analysis.trials import find_parent
    from ..core.errors import UserError
    from ..engine import model_registry
    from .export import selected_checkpoint

    client, stage_run = mlflow_client(uri), find_parent(uri, stage)
    tags, version = stage_run.data.tags, None
    if MODEL_TAG not in tags:
        try:
            with selected_checkpoint(storage, uri, stage) as (path, row, step):
                info = model_registry.log_checkpoint_model(uri, row["run_id"], path, step, name if register else None)
        except UserError as exc:
            log(f"{stage}: no model logged ({exc})")
            return
        except (OSError, RuntimeError) as exc:  # the figures stand; the model can be logged again
            log(f"{stage}: no model logged ({type(exc).__name__}: {exc}); --resume tries again")
            return
        uri_of_model, version = info["model_uri"], info["registered_version"]
        client.set_tag(stage_run.info.run_id, MODEL_TAG, uri_of_model)
        client.set_tag(find_parent(uri, name).info.run_id, "retrain.model_uri", uri_of_model)
        log(f"{stage}: seed {int(row['seed'])} (best on validation) logged as {info['format']} model {uri_of_model}")
    elif register and REGISTERED_TAG not in tags:
        version = model_registry.register(uri, tags[MODEL_TAG], name)
    if version is not None:
        client.set_tag(stage_run.info.run_id, REGISTERED_TAG, f"{name}/{version}")
        log(f"{stage}: registered as models:/{name}/{version}")


def main_after_sweep(args, rc: int) -> int:
    """cli.sweep_main's follow-up: the retrain stage when the search was not interrupted."""
    try:
        stage_rc = run(args)
    except Exception as exc:  # noqa: BLE001 - a failed follow-up must say how to redo it
        print(f"warning: the retrain stage failed ({type(exc).__name__}: {exc}); run the same command "
              "with --resume to retry it", file=sys.stderr)
        return rc or 1
    return rc or stage_rc
