"""Inference cost: one denoising step (`Recipe.denoise`, what evaluation and the sampler call) and
whole generations (`diffusion.sample`, T reverse steps) for the base model, trajectory modules
with K phases, weight LoRA unmerged and merged into the weights (PEFT `merge_and_unload`),
bottleneck adapters, the router composing n trained trajectory modules, and the noise-aware
methods, which no merge removes: NaRA (its core C(t) cached per step, and recomputed by every
layer for every row, `nara.cache_core: false`) and the continuous-t trajectory module.

The router refuses fewer than two experts, so its curve starts at n = 2; n = 1 is a trajectory
module alone (the K rows). Experts are one trajectory checkpoint saved here and listed n times:
cost does not depend on the values of the trained tensors.
"""

from __future__ import annotations

import tempfile

import torch

from ...core import checkpoint, diffusion
from .timing import fit_exponent, interleave, summarise
from .workbench import Workbench, filler_examples

BASE = "base"


def infer_variants(wb: Workbench, expert_dir: str) -> dict[str, dict]:
    mid = [wb.mid_layer()]
    traj = {"method": "trajectory", "trajectory.injection_layers": mid}
    out = {BASE: {"method": "full"}}  # full fine-tuning attaches nothing: the backbone as it is
    out.update({f"trajectory K={k}": {**traj, "trajectory.num_phases": k} for k in wb.size.phases})
    out["lora unmerged"] = {"method": "lora", "lora.rank": 8}
    out["lora merged"] = {"method": "lora", "lora.rank": 8}
    out["adapter"] = {"method": "adapter"}
    out["nara"] = {"method": "nara", "nara.rank": 8}  # LoRA's rank: beside "lora unmerged" / "merged"
    out["nara uncached"] = {"method": "nara", "nara.rank": 8, "nara.cache_core": False}
    out["trajectory continuous"] = {**traj, "method": "trajectory_continuous"}
    out.update({f"router n={n}": {"method": "router", "router.checkpoints": [expert_dir] * n}
                for n in wb.size.modules})
    return out


def save_expert(wb: Workbench, directory: str) -> str:
    """A trajectory checkpoint (K = 4 phases, mid-depth) for the router to compose."""
    recipe = wb.recipe({"method": "trajectory", "trajectory.injection_layers": [wb.mid_layer()],
                        "trajectory.num_phases": 4})
    checkpoint.save(directory, recipe.method, recipe.config, recipe.fingerprint, recipe.backbone.source)
    return directory


def build(wb: Workbench, variants: dict[str, dict]) -> dict[str, object]:
    recipes = {}
    for name, sets in variants.items():
        recipe = recipes[name] = wb.recipe(sets)
        recipe.method.eval()
        if name == "lora merged":
            recipe.method.tuner.merge_and_unload()  # W + (alpha/r) B A folded in; LoRA layers gone
    return recipes


def response_batch(recipe, batch: int, prompt_len: int, response_len: int) -> diffusion.Batch:
    """`batch` rows of a prompt_len-token prompt and an all-masked response of response_len tokens."""
    recipe.config.max_length = prompt_len + response_len + 2
    mask = recipe.backbone.mask_token_id
    return recipe.encode(filler_examples(batch, prompt_len), [[mask] * response_len] * batch)


def denoise_step(recipe, batch: diffusion.Batch) -> None:
    t = torch.full((batch.input_ids.shape[0],), 0.5)
    with torch.no_grad():
        recipe.denoise(batch.input_ids, batch.attention_mask, batch.response_mask, t, batch.prompt_mask,
                       batch.task_ids)


def generate(recipe, batch: diffusion.Batch, steps: int) -> None:
    diffusion.sample(recipe.denoiser(batch), batch, recipe.backbone.mask_token_id, steps, "low_confidence",
                     torch.Generator().manual_seed(0), "linear")


def time_steps(wb: Workbench, recipes: dict, log=print) -> dict:
    """One denoising step at the inference shape, a quarter of the sequence masked."""
    b, s = wb.size.infer_shape
    batches = {n: response_batch(r, b, s - s // 4 - 2, s // 4) for n, r in recipes.items()}
    cases = {n: (lambda r=r, x=batches[n]: denoise_step(r, x)) for n, r in recipes.items()}
    stats = summarise(interleave(cases, wb.size.step_repeats), BASE)
    if log:
        log(f"denoise step {b}x{s}: " + ", ".join(f"{n} {v['ratio']:.3f}" for n, v in stats.items()))
    return {"batch": b, "seq": s, "variants": stats}


def time_generations(wb: Workbench, recipes: dict, log=print) -> list[dict]:
    """Whole generations of a max(T)-token response for each T (every step unmasks something)."""
    length, prompt = max(wb.size.gen_steps), 16
    batches = {n: response_batch(r, wb.size.gen_batch, prompt, length) for n, r in recipes.items()}
    rows = []
    for i, steps in enumerate(wb.size.gen_steps):
        cases = {n: (lambda r=r, x=batches[n], T=steps: generate(r, x, T)) for n, r in recipes.items()}
        stats = summarise(interleave(cases, wb.size.repeats, warmup=1 if i == 0 else 0), BASE)
        rows.append({"steps": steps, "batch": wb.size.gen_batch, "response_tokens": length,
                     "prompt_tokens": prompt, "variants": stats})
        if log:
            log(f"generation T={steps}: " + ", ".join(f"{n} {v['median_s']:.3f}s" for n, v in stats.items()))
    return rows


def growth(wb: Workbench, step: dict) -> dict:
    """Per-step cost vs K phases and vs composed modules (with n = 1 the K = 4 module alone)."""
    v = step["variants"]
    ks = list(wb.size.phases)
    ns = [1, *wb.size.modules]
    k_steps = [v[f"trajectory K={k}"]["median_s"] for k in ks]
    n_steps = [v["trajectory K=4"]["median_s"] if 4 in ks else v[f"trajectory K={ks[-1]}"]["median_s"],
               *(v[f"router n={n}"]["median_s"] for n in wb.size.modules)]
    return {"phases": {"x": ks, "step_s": k_steps, "exponent": fit_exponent(ks, k_steps)},
            "modules": {"x": ns, "step_s": n_steps, "exponent": fit_exponent(ns, n_steps),
                        "base_step_s": v[BASE]["median_s"]}}


def run(wb: Workbench, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipes = build(wb, infer_variants(wb, save_expert(wb, tmp)))
        step = time_steps(wb, recipes, log)
        gens = time_generations(wb, recipes, log)
    return {"step": step, "generation": gens, "growth": growth(wb, step)}
