"""Side-by-side measurements. `compare_variants`: several config variants trained in one process,
one after another, with accuracy and step time as a ratio to the first (jobs/calibrate_injection.py).
`run_benchmark`: what the method costs (`lora-diffusion bench`): training (train.py), memory,
inference (infer.py), the sweep engine (sweep.py) and data-parallel scaling over Ray Train
workers (scaling.py), every section's variants interleaved
in one process and reported as ratios to a named reference; the JSON, an MLflow run, and the
README's table and plots from the JSON (report.py). These machines are noisy: only ratios
taken in one run are comparable."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ...core import config as config_lib


def compare_variants(base: dict, variants: dict[str, dict], log=print) -> list[dict]:
    """Train `base` overridden by each variant's settings (name -> {key: value}), in order; one
    row per variant: accuracies, trainable params, step time and its ratio to the first."""
    from ...core.recipe import Recipe

    rows = []
    for name, sets in variants.items():
        config = config_lib.from_dict({}, {**base, **sets})
        t0 = time.perf_counter()
        recipe = Recipe(config)
        result = recipe.run(log=log)
        rows.append({
            "variant": name, "sets": sets,
            "validation/accuracy": result["validation/accuracy"],
            "validation/accuracy_sampler": result["validation/accuracy_sampler"],
            "validation/examples": result["validation/examples"], "train/accuracy": result["train/accuracy"],
            "trainable_params": result["accounting"]["trainable_params"],
            "step_time_s": result["step_time_s"], "tokens_per_s": result["tokens_per_s"],
            "wall_time_s": time.perf_counter() - t0,
        })
        if log:
            log(json.dumps(rows[-1]))
    ref = rows[0]["step_time_s"]
    for row in rows:
        row["step_time_ratio"] = row["step_time_s"] / ref
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table, one line per variant."""
    lines = ["| variant | trainable params | validation acc (ELBO) | validation acc (sampler) | train acc "
             "| step time s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_params']} | {r['validation/accuracy']:.3f} | "
                     f"{r['validation/accuracy_sampler']:.3f} | {r['train/accuracy']:.3f} | "
                     f"{r['step_time_s']:.3f} | {r['step_time_ratio']:.2f} |")
    return "\n".join(lines)


def write_markdown(path: str | Path, base: dict, rows: list[dict]) -> None:
    """The table under a line with the base settings, written to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"base: {json.dumps(base)}\n\n{markdown(rows)}\n")


# ----------------------------------------------------------------------------- `lora-diffusion bench`

SECTIONS = ("train", "memory", "infer", "sweep", "scaling")
RAY_SECTIONS = ("sweep", "scaling")  # start Ray themselves: run from a driver, never inside a Ray task


def machine() -> dict:
    """What the figures were measured on (ratios travel between machines; seconds do not)."""
    import os
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_benchmark(size_name: str, sections=SECTIONS, data_dir: str | None = None, out: str | Path | None = None,
                  previous: dict | None = None, sweep_args: list[str] | None = None, log=print) -> dict:
    """Measure the given sections at one size; a section not measured keeps its figures from
    `previous` (so sections can run one at a time). Written to `out` after each section."""
    import torch

    from . import infer as bench_infer, train as bench_train
    from .workbench import SIZES, Workbench

    size = SIZES[size_name]
    torch.set_num_threads(size.threads)
    result = {**(previous or {}), "size": size_name, "settings": dataclasses.asdict(size), "machine": machine()}
    # which run measured each section: one kept from `previous` keeps its own date and load
    earlier = (previous or {}).get("machine")
    result["section_machines"] = {**{k: earlier for k in SECTIONS if earlier and k in (previous or {})},
                                  **(previous or {}).get("section_machines", {})}
    wb = Workbench(size, data_dir=data_dir) if set(sections) & {"train", "memory", "infer"} else None

    def save(section: str):
        result["machine_end"] = machine()  # the load the last section left (the header's "at the end")
        result["section_machines"][section] = result["machine_end"]
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1))

    if "infer" in sections:
        result["infer"] = bench_infer.run(wb, log)
        save("infer")
    if "train" in sections:
        variants = bench_train.train_variants(wb)
        recipes = bench_train.build(wb, variants)
        rows = bench_train.time_shapes(wb, recipes, variants, size.train_shapes, log)
        growth = {n: r for n, r in recipes.items() if n in bench_train.GROWTH_VARIANTS}
        rows += bench_train.time_shapes(wb, growth, variants, size.growth_shapes, log)
        result["train"] = {"reference": bench_train.REFERENCE, "floor": bench_train.FLOOR, "rows": rows,
                           "growth": bench_train.growth(wb, log)}
        save("train")
    if "memory" in sections:
        rows = bench_train.memory(size_name, bench_train.train_variants(wb), data_dir, log)
        result["memory"] = {"reference": bench_train.REFERENCE, "rows": rows}
        save("memory")
    if "sweep" in sections:
        from .sweep import run_sweep

        workdir = Path(out).parent / "sweep" if out else Path("runs") / "bench" / "sweep"
        result["sweep"] = run_sweep(sweep_args or [], workdir, log)
        save("sweep")
    if "scaling" in sections:
        from . import scaling as bench_scaling

        workdir = Path(out).parent / "scaling" if out else Path("runs") / "bench" / "scaling"
        result["scaling"] = bench_scaling.run(size, data_dir, workdir, log)
        save("scaling")
    return result


def log_to_mlflow(result: dict, tracking_uri: str, files: list[Path]) -> str:
    """One MLflow run (experiment lora-diffusion-bench): the machine and size as params, every
    figure as a metric, the JSON and the plots as artifacts. Returns the run id."""
    import mlflow

    from ...engine.tracking import prepare_uri

    client = mlflow.MlflowClient(prepare_uri(tracking_uri))
    exp = client.get_experiment_by_name("lora-diffusion-bench")
    exp_id = exp.experiment_id if exp else client.create_experiment("lora-diffusion-bench")
    run = client.create_run(exp_id, run_name=f"bench {result['size']} {result['machine']['date']}")
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in
                                              {"size": result["size"], **result["machine"]}.items()])
    metrics = [mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in flat_figures(result).items()]
    for i in range(0, len(metrics), 900):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 900])
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def flat_figures(tree, prefix: str = "") -> dict[str, float]:
    """Every number in the result, keyed by its path (MLflow names take letters, digits, `_-. :/`)."""
    out: dict[str, float] = {}
    items = tree.items() if isinstance(tree, dict) else [(_row_key(i, v), v) for i, v in enumerate(tree)] \
        if isinstance(tree, list) else ()
    for key, value in items:
        name = f"{prefix}{key}".replace(",", "").replace("(", "").replace(")", "").replace("=", "_")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (dict, list)):
            out.update(flat_figures(value, name + "/"))
    return out


def _row_key(index: int, row) -> str:
    """A list item's name: `variant/BxS` for measurement rows, `T=steps` for generations, else its index."""
    if isinstance(row, dict) and "variant" in row and "batch" in row:
        return f"{row['variant']}/{row['batch']}x{row['seq']}"
    if isinstance(row, dict) and "steps" in row and "variants" in row:
        return f"T={row['steps']}"
    return str(index)


# ----------------------------------------------------------------------------- the command line


def build_parser(prog: str | None = None):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description="What the methods cost: training, memory, inference, "
                                "the sweep engine, data-parallel scaling; a JSON, growth plots and an MLflow run.")
    p.add_argument("--size", default="small", help="smoke (tiny model, seconds) | small (this 2-core machine, "
                                                  "about half an hour) | full (the issue's grid)")
    p.add_argument("--sections", default="train,memory,infer", help="comma-separated: " + ",".join(SECTIONS))
    p.add_argument("--out", default="runs/bench/bench.json",
                   help="the JSON; sections not measured keep their figures from an existing file")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --out file")
    p.add_argument("--data-dir")
    p.add_argument("--sweep-arg", action="append", metavar="ARG",
                   help="extra argument for the measured sweep (e.g. --sweep-arg=--num-samples=4)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`lora-diffusion bench`: raises UserError on bad input (the CLI prints it, exit 2)."""
    from ...core.errors import UserError
    from .workbench import SIZES

    args = build_parser(prog).parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or args.size not in SIZES:
        raise UserError(f"sections: {bad[0]} is not one of {', '.join(SECTIONS)}" if bad else
                        f"size: {args.size} is not one of {', '.join(SIZES)}")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() and not args.fresh else None
    result = run_benchmark(args.size, sections, args.data_dir, out, previous, args.sweep_arg or [])
    from . import report  # imported when measuring is done

    files = [out, *report.write_plots(result, out.parent)]
    if not args.no_mlflow:
        from ...engine.options import default_tracking_uri

        run_id = log_to_mlflow(result, args.tracking_uri or default_tracking_uri(), files)
        print(f"mlflow run {run_id}")
    print(report.table(result))
    print(f"{out} and {len(files) - 1} plots written")
    return 0


def report_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`lora-diffusion bench-report`: raises UserError on bad input (the CLI prints it, exit 2)."""
    import argparse

    from ...core.errors import UserError
    from .report import replace_section, table, write_plots

    p = argparse.ArgumentParser(prog=prog, description="The README's performance table and growth plots, "
                                "generated from a bench JSON (`lora-diffusion bench`).")
    p.add_argument("--json", default="runs/bench/bench.json")
    p.add_argument("--readme", help="replace the section between the bench markers of this file")
    p.add_argument("--plots", default="docs/bench", help="folder of the growth plots (PNG)")
    p.add_argument("--mlflow", nargs="?", const="default", metavar="TRACKING_URI",
                   help="also log the JSON and plots as an MLflow run (default store: runs/mlflow.db)")
    args = p.parse_args(argv)
    if not Path(args.json).is_file():
        raise UserError(f"json: {args.json} not found (run lora-diffusion bench first)")
    result = json.loads(Path(args.json).read_text())
    plots = write_plots(result, Path(args.plots))
    text = table(result, plot_dir=args.plots, relative_to=Path(args.readme).parent if args.readme else None)
    if args.mlflow:
        from ...engine.options import default_tracking_uri

        uri = default_tracking_uri() if args.mlflow == "default" else args.mlflow
        print(f"mlflow run {log_to_mlflow(result, uri, [Path(args.json), *plots])} in {uri}")
    if args.readme:
        replace_section(Path(args.readme), text)
        print(f"{args.readme}: performance section replaced; {len(plots)} plots in {args.plots}")
    else:
        print(text)
    return 0
