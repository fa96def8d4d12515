"""Side-by-side measurements (calibration variants): several config variants trained in one
process, one after another, with step time reported as a ratio to the first variant (these
machines are noisy: only ratios taken in one run are comparable). Used by
jobs/calibrate_injection.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core import config as config_lib


def compare_variants(base: dict, variants: dict[str, dict], log=print) -> list[dict]:
    """Train `base` overridden by each variant's settings (name -> {key: value}), in order; one
    row per variant: accuracies, trainable params, step time and its ratio to the first."""
    from ..core.recipe import Recipe

    rows = []
    for name, sets in variants.items():
        config = config_lib.from_dict({}, {**base, **sets})
        t0 = time.perf_counter()
        recipe = Recipe(config)
        result = recipe.run(log=log)
        rows.append({
            "variant": name, "sets": sets,
            "validation/accuracy": result["validation/accuracy"], "validation/accuracy_sampler": result["validation/accuracy_sampler"],
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
    lines = ["| variant | trainable params | validation acc (ELBO) | validation acc (sampler) | train acc | step time s | ratio |",
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
