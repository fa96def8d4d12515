"""Training cost: step time and tokens/s of every method side by side (`Recipe.train_step`, the
loop `lora-diffusion train` runs), the backbone's no-gradient forward as the floor, growth with
the number of phases K and of injection layers, and peak memory per variant in a subprocess.

    python -m lora_diffusion.experiments.bench.train --memory trajectory-mid --size small

prints one variant's memory as JSON (what `memory` runs for each variant).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from ...core import diffusion, precision
from ...core.methods import registry
from .timing import fit_exponent, interleave, peak_rss_mb, reset_peak, rss_mb, summarise
from .workbench import SIZES, Workbench, set_shape

FLOOR = "floor (no-grad forward)"
REFERENCE = "lora-attn"  # PEFT LoRA on attention: what trajectory LoRA is measured against
# Named variants, then every other method of the registry with its defaults. The first four and
# lora-attn share one budget (73,728 trainable parameters on MiniLM: rank 48 x 2 phases at one
# layer, PEFT rank 4 on Q/K/V/O), as in the baseline comparison.
SKIP = {"router", "lora_merge"}  # compose trained experts: the router is measured at inference (infer.py)
GROWTH_VARIANTS = (FLOOR, "trajectory-mid", "trajectory-every", REFERENCE, "full")  # over growth_shapes


def train_variants(wb: Workbench) -> dict[str, dict | None]:
    """Variant name -> config overrides (None: the floor)."""
    rank = min(48, wb.backbone.hidden_size // 2)
    traj = {"method": "trajectory", "trajectory.rank": rank, "trajectory.num_phases": 2}
    out: dict[str, dict | None] = {
        FLOOR: None,
        "trajectory-last": {**traj, "trajectory.injection_layers": [-1]},
        "trajectory-mid": {**traj, "trajectory.injection_layers": [wb.mid_layer()]},
        "trajectory-every": {**traj, "trajectory.injection_layers": list(range(wb.num_layers))},
        REFERENCE: {"method": "lora", "lora.rank": 4, "lora.targets": "attention"},
        "lora-attn-mlp": {"method": "lora", "lora.rank": 4, "lora.targets": "attention_mlp"},
        "tlora": {"method": "tlora", "tlora.rank": 4},
        "trajectory_continuous": {"method": "trajectory_continuous", "trajectory.rank": rank,
                                  "trajectory.injection_layers": [wb.mid_layer()]},
    }
    named = {s.get("method") for s in out.values() if s}
    for spec in registry.specs():
        if spec.name not in named and spec.name not in SKIP:
            out[spec.name] = {"method": spec.name}
    return out


def floor_step(recipe) -> None:
    """The frozen backbone's forward on a training batch, masked as the loss masks it, no graph."""
    c = recipe.config
    batch = recipe.encode(recipe.train_batch(recipe.step))
    gen = torch.Generator().manual_seed(recipe.step)
    t = diffusion.sample_times(batch.input_ids.shape[0], c.diffusion.t_min, gen)
    noisy, masked = diffusion.apply_mask(batch, t, recipe.backbone.mask_token_id, c.diffusion.noise_schedule,
                                         gen, nonempty=True)
    with torch.no_grad(), precision.autocast(recipe.precision, recipe.device):  # as the step computes
        recipe.backbone.logits(noisy, batch.attention_mask, masked)
    recipe.step += 1


def step_fn(recipe, floor: bool):
    return (lambda: floor_step(recipe)) if floor else recipe.train_step


def build(wb: Workbench, variants: dict[str, dict | None]) -> dict[str, object]:
    """One recipe per variant (the floor runs the backbone of a `full` recipe, no hooks)."""
    return {name: wb.recipe(sets if sets is not None else {"method": "full"}) for name, sets in variants.items()}


def time_shapes(wb: Workbench, recipes: dict, variants: dict, shapes, log=print) -> list[dict]:
    """Interleaved step times of every variant at each (batch, sequence): one row per variant x shape."""
    rows = []
    for batch, seq in shapes:
        for recipe in recipes.values():
            set_shape(recipe, batch, seq)
        cases = {name: step_fn(r, variants[name] is None) for name, r in recipes.items()}
        stats = summarise(interleave(cases, wb.size.repeats), REFERENCE if REFERENCE in cases else None)
        for name, s in stats.items():
            params = sum(p.numel() for p in recipes[name].params) if variants[name] is not None else 0
            rows.append({"variant": name, "batch": batch, "seq": seq, "trainable_params": params,
                         "step_s": s["median_s"], "min_s": s["min_s"], "max_s": s["max_s"],
                         "tokens_per_s": batch * seq / s["median_s"], "ratio_to_reference": s.get("ratio"),
                         "repeats": s["repeats"]})
        if log:
            log(f"train {batch}x{seq}: " + ", ".join(f"{n} {s['median_s']:.3f}s" for n, s in stats.items()))
    return rows


def growth(wb: Workbench, log=print) -> dict:
    """Trajectory training step vs K phases (mid-depth) and vs injection layers (from the first)."""
    rank = min(8, wb.backbone.hidden_size // 4)
    base = {"method": "trajectory", "trajectory.rank": rank}
    phases = {f"K={k}": {**base, "trajectory.num_phases": k, "trajectory.injection_layers": [wb.mid_layer()]}
              for k in wb.size.phases}
    counts = sorted({n for n in (1, 2, 3, wb.num_layers) if n <= wb.num_layers})
    layers = {f"layers={n}": {**base, "trajectory.num_phases": 2, "trajectory.injection_layers": list(range(n))}
              for n in counts}
    variants = {**phases, **layers}
    rows = time_shapes(wb, build(wb, variants), variants, [wb.size.growth_shape], log)
    by = {r["variant"]: r["step_s"] for r in rows}
    return {"shape": list(wb.size.growth_shape),
            "phases": curve(list(wb.size.phases), [by[f"K={k}"] for k in wb.size.phases]),
            "injection_layers": curve(counts, [by[f"layers={n}"] for n in counts])}


def curve(xs: list, ys: list[float]) -> dict:
    return {"x": xs, "step_s": ys, "exponent": fit_exponent(xs, ys)}


# ----------------------------------------------------------------------------- memory


def measure_memory(wb: Workbench, name: str, sets: dict | None) -> dict:
    """Peak resident memory of two training steps per memory shape, above the resident set with
    the model and method built (that difference is what training the variant costs)."""
    recipe = wb.recipe(sets if sets is not None else {"method": "full"}, copy_backbone=False)
    step = step_fn(recipe, sets is None)
    cuda = recipe.device.type == "cuda"  # on a GPU: torch's allocator, not the process
    reset_peak()
    model_mb = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    rows = []
    for batch, seq in sorted(wb.size.memory_shapes, key=lambda s: s[0] * s[1]):
        set_shape(recipe, batch, seq)
        reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        step()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
        rows.append({"variant": name, "batch": batch, "seq": seq, "train_mb": peak - model_mb,
                     "peak_mb": peak, "model_mb": model_mb, "kind": "cuda_allocated" if cuda else "rss"})
    return {"variant": name, "shapes": rows}


def memory(size_name: str, variants: dict, data_dir: str | None, log=print) -> list[dict]:
    """`measure_memory` of each variant, each in a fresh subprocess (a process's peak is monotone)."""
    size = SIZES[size_name]
    names = [n for n in variants if size.memory_variants is None or n in size.memory_variants]
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", __name__, "--memory", name, "--size", size_name]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            raise RuntimeError(f"memory of {name} failed: {out.stderr.strip().splitlines()[-1:]}")
        rows += json.loads(out.stdout.strip().splitlines()[-1])["shapes"]
        if log:
            log(f"memory {name}: " + ", ".join(f"{r['batch']}x{r['seq']} {r['train_mb']:.0f} MB" for r in rows[-1:]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one variant's training memory, as JSON")
    p.add_argument("--memory", required=True, help="variant name")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    wb = Workbench(SIZES[args.size], data_dir=args.data_dir)
    torch.set_num_threads(wb.size.threads)
    print(json.dumps(measure_memory(wb, args.memory, train_variants(wb)[args.memory])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
