"""Baseline comparison: every method x seed x task at a matched parameter budget, one loop.

For each task and method: match the budget (`budget.match_budget`; full and BitFit keep their
fixed size, flagged `budget_matched: false`), pick the learning rate from a small grid by ELBO
accuracy on a seeded *dev subset* after a short run (seed of the first seed), then train every
seed with that rate for the full number of steps and report dev accuracy. Because the rate is
chosen on part of dev, each run also reports `dev_unseen/accuracy`, on the dev rows the search
never looked at: that is the number free of selection bias.

Runs go through `Recipe` without Ray (one process); `run_comparison` returns plain data that
`write_outputs` turns into results JSON and a markdown table.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import config as config_lib
from . import tasks
from .backbone import load_backbone
from .budget import count_params, knob_of, match_budget

# learning-rate grids per method, from measurements on MiniLM / SST-2 (see the baselines report)
LR_GRIDS: dict[str, list[float]] = {
    "trajectory": [1e-3, 3e-3],
    "trajectory_adapter": [1e-3, 3e-3],
    "lora": [1e-3, 3e-3],
    "tlora": [1e-3, 3e-3],
    "adapter": [1e-3, 3e-3],
    "prefix": [3e-3, 1e-2],
    "bitfit": [3e-3, 1e-2],
    "full": [3e-5, 1e-4],
}
ALL_METHODS = list(LR_GRIDS)


@dataclass
class ComparisonSpec:
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    tasks: list[str] = field(default_factory=lambda: ["sst2", "ag_news"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 600
    budget: int | None = None  # target trainable parameters; None = each method's default size
    search_steps: int | None = None  # steps of each lr-search run (default steps // 3)
    search_dev_examples: int = 200  # size of the seeded dev subset the lr is chosen on
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: dict(LR_GRIDS))
    sets: dict[str, object] = field(default_factory=dict)  # config overrides for every run


def _config(spec: ComparisonSpec, task: str, method: str, **sets):
    return config_lib.from_dict({}, {**spec.sets, "task": task, "method": method, **sets})


def _train(config, log: Callable[[str], None] | None):
    from .train import Recipe

    recipe = Recipe(config)
    result = recipe.run(log=log)
    return recipe, result


def search_lr(spec: ComparisonSpec, config, log=None) -> tuple[float, list[dict]]:
    """The grid value with the best dev-subset ELBO accuracy after a short run (ties: smaller lr)."""
    from .train import Recipe

    trials = []
    if len(spec.lr_grids[config.method]) == 1:  # nothing to choose
        return spec.lr_grids[config.method][0], trials
    steps = spec.search_steps or max(1, spec.steps // 3)
    for lr in spec.lr_grids[config.method]:
        c = config_lib.from_dict(config.to_dict(), {
            "train.lr": lr, "train.steps": steps, "max_eval_examples": spec.search_dev_examples})
        recipe = Recipe(c)
        while recipe.step < steps:
            recipe.train_step()
        acc = recipe.evaluate(recipe.dev_examples, "dev", sampler=False)["dev/accuracy"]
        trials.append({"lr": lr, "steps": steps, "dev_subset/accuracy": acc,
                       "dev_subset/examples": len(recipe.dev_examples)})
        if log:
            log(f"  lr search {config.method} lr={lr:g}: dev-subset accuracy {acc:.4f}")
    best = max(trials, key=lambda r: (r["dev_subset/accuracy"], -r["lr"]))
    return best["lr"], trials


def run_comparison(spec: ComparisonSpec, log: Callable[[str], None] | None = print) -> dict:
    runs, searches, sizes = [], [], []
    for task in spec.tasks:
        base = _config(spec, task, spec.methods[0])
        torch.manual_seed(0)
        backbone = load_backbone(base.backbone, trust_remote_code=base.trust_remote_code,
                                 allow_hub=base.allow_hub)
        search_ids = {e.id for e in tasks.load_split(
            task, "dev", base.data_dir, max_examples=spec.search_dev_examples,
            seed=spec.seeds[0], allow_hub=base.allow_hub)}
        for method in spec.methods:
            config = _config(spec, task, method, **{"train.steps": spec.steps,
                                                    "train.seed": spec.seeds[0]})
            if spec.budget:
                config = match_budget(config, backbone, spec.budget, fixed_ok=True)
            knob = knob_of(method)
            size = {"task": task, "method": method, "knob": knob,
                    "knob_value": config.flat()[knob] if knob else None,
                    "trainable_params": count_params(config, backbone),
                    "budget_matched": bool(spec.budget) and knob is not None}
            sizes.append(size)
            lr, trials = search_lr(spec, config, log)
            searches.append({"task": task, "method": method, "chosen_lr": lr, "trials": trials})
            for seed in spec.seeds:
                c = config_lib.from_dict(config.to_dict(), {"train.lr": lr, "train.seed": seed})
                t0 = time.perf_counter()
                recipe, result = _train(c, None)
                unseen = [e for e in recipe.dev_examples if e.id not in search_ids]
                if unseen and recipe.spec.kind == "classification":
                    result.update(recipe.evaluate(unseen, "dev_unseen", sampler=False))
                result.update({"lr": lr, "knob": size["knob"], "knob_value": size["knob_value"],
                               "budget_matched": size["budget_matched"],
                               "run_time_s": time.perf_counter() - t0})
                runs.append(result)
                if log:
                    log(f"{task} {method} seed={seed} lr={lr:g}: dev/accuracy "
                        f"{result.get('dev/accuracy', float('nan')):.4f}  params "
                        f"{result['accounting']['trainable_params']}  step "
                        f"{result['step_time_s']:.3f}s")
    return {"spec": asdict(spec), "sizes": sizes, "lr_search": searches, "runs": runs,
            "summary": summarize(runs)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["task"], r["method"]) for r in runs}, key=lambda k: (k[0], ALL_METHODS.index(k[1])
                                                                          if k[1] in ALL_METHODS else 99))
    for task, method in keys:
        rs = [r for r in runs if r["task"] == task and r["method"] == method]
        acc = rs[0]["accounting"]
        row = {"task": task, "method": method, "seeds": len(rs), "lr": rs[0]["lr"],
               "knob": rs[0]["knob"], "knob_value": rs[0]["knob_value"],
               "budget_matched": rs[0]["budget_matched"],
               "trainable_params": acc["trainable_params"], "bytes_saved": acc["bytes_saved"],
               "percent_of_backbone": acc["percent_of_backbone"]}
        for metric in ("dev/accuracy", "dev/accuracy_sampler", "dev_unseen/accuracy",
                       "train/accuracy", "step_time_s"):
            row[metric] = _mean_std([r.get(metric) for r in rs])
        rows.append(row)
    return rows


def markdown_table(summary: list[dict]) -> str:
    head = ("| task | method | size knob | trainable params | bytes | dev acc (ELBO) | "
            "dev acc (sampler) | dev acc, rows unseen by lr search | train acc | step time (s) | lr |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]

    def ms(v, digits=3):
        mean, std = v
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if mean == mean else "n/a"

    for r in summary:
        knob = f"{r['knob']}={r['knob_value']}" if r["knob"] else "fixed size"
        if r["knob"] and not r["budget_matched"]:
            knob += " (default)"
        lines.append(
            f"| {r['task']} | {r['method']} | {knob} | {r['trainable_params']:,} | "
            f"{r['bytes_saved']:,} | {ms(r['dev/accuracy'])} | {ms(r['dev/accuracy_sampler'])} | "
            f"{ms(r['dev_unseen/accuracy'])} | {ms(r['train/accuracy'])} | "
            f"{ms(r['step_time_s'])} | {r['lr']:g} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output: str | Path) -> tuple[Path, Path]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    notes = [
        f"Methods x seeds {result['spec']['seeds']} x tasks {result['spec']['tasks']}, "
        f"{result['spec']['steps']} steps, budget {result['spec']['budget'] or 'default sizes'}.",
        "Mean ± std over seeds. Accuracy is label-word scoring on dev, never on training rows; the "
        "learning rate was picked on a seeded dev subset, so `dev acc, rows unseen by lr search` "
        "is the selection-free number. full and bitfit have no size knob (fixed size).",
    ]
    notes += [f"- {t}: {tasks.get_task(t).split_note}" for t in result["spec"]["tasks"]]
    md_path.write_text("\n".join(notes) + "\n\n" + markdown_table(result["summary"]))
    return json_path, md_path


