"""The GPU check (`lora-diffusion gpu-check`, jobs/gpu_check.py): one trial's training step where
users run it, on a bare GPU machine (torch, transformers, peft; no Ray, MLflow, Optuna or
datasets; no network), in under 8 minutes.

An LLaDA-8B-shaped stand-in at its real sizes (core/standin.py: random bf16 weights made on the
GPU) carries PEFT LoRA (r = 32 on every linear layer of the blocks, the public diffusion-LM
trainers' default) or trajectory LoRA (r = 32 after the middle block), each with activation
checkpointing off and on, all under bf16-mixed; PEFT LoRA with checkpointing also under fp32, for
the precision ratio. Each variant trains on one repeated batch with one repeated draw of t and
masks: the loss must be finite and fall. Reported per variant: step time, tokens/s, peak memory,
model FLOP/s against the GPU's dense bf16 peak; then the sampler's cost per denoising step (one
no-grad forward at every response position) with each module and without.

Model FLOPs per token (recomputation by checkpointing not counted: model, not hardware, FLOPs):
  4 N          the blocks' frozen linear weights N: forward 2 N and activation gradients 2 N
               (frozen weights get no weight gradient)
  6 n          the adapters' n trainable weights: forward, activation and weight gradients
  12 L S d     attention scores and values over S positions, forward (4 S d) and gradients (8 S d)
  4 V d f      the head at masked positions (a fraction f of the tokens): forward and input gradient
`--size tiny` runs the same on a tiny LLaDA-shaped model on the CPU (its CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ...core import config as config_lib, diffusion, standin
from ...core.diffusion import seeded
from ...core.step import StepModel, attach, denoise, loss_backward

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) of the GPUs this runs on, by name fragment
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}
TINY_LLADA = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 64, "n_heads": 4,
              "n_kv_heads": 4, "n_layers": 4, "mlp_hidden_size": 128, "vocab_size": 126464,
              "embedding_size": 126464, "weight_tying": False, "include_bias": False,
              "rms_norm_eps": 1e-5, "max_sequence_length": 256, "torch_dtype": "bfloat16"}
SIZES = {"gpu": dict(batch=4, length=1024, steps=6, warmup=2), "tiny": dict(batch=2, length=32, steps=4, warmup=1)}


def variants(layers: int) -> list[tuple[str, dict, str, bool]]:
    """(name, config settings, precision, checkpointing) of every variant, in run order."""
    lora = {"method": "lora", "lora.rank": 32, "lora.alpha": 32.0, "lora.targets": "attention_mlp", "train.lr": 1e-3}
    trajectory = {"method": "trajectory", "trajectory.rank": 32, "trajectory.num_phases": 4,
                  "trajectory.injection_layers": [layers // 2 - 1], "train.lr": 5e-3}
    return [("lora", lora, "bf16-mixed", False), ("lora ckpt", lora, "bf16-mixed", True),
            ("trajectory", trajectory, "bf16-mixed", False), ("trajectory ckpt", trajectory, "bf16-mixed", True),
            ("lora ckpt fp32", lora, "fp32", True)]


def random_batch(vocab: int, mask_id: int, batch: int, length: int, device) -> diffusion.Batch:
    """Random ids, the first half of each row the prompt and the second the response."""
    gen = seeded(0, 1)
    ids = torch.randint(0, vocab - 1, (batch, length), generator=gen)
    ids[ids == mask_id] += 1
    response = torch.zeros(batch, length, dtype=torch.bool)
    response[:, length // 2:] = True
    return diffusion.Batch(ids.to(device), torch.ones_like(ids).to(device), response.to(device),
                           (~response).to(device), torch.zeros(batch, dtype=torch.long, device=device))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model: StepModel, length: int, masked_fraction: float) -> float:
    """Model FLOPs per token of one training step (module docstring)."""
    layers, bb = model.backbone.layers, model.backbone
    frozen = sum(p.numel() for p in layers.parameters() if p.dim() == 2 and not p.requires_grad)
    trained = sum(p.numel() for p in model.method.trainable().values())
    d, vocab = bb.hidden_size, bb.vocab_size
    return 4 * frozen + 6 * trained + 12 * len(layers) * length * d + 4 * vocab * d * masked_fraction


def train_variant(model: StepModel, batch, lr: float, steps: int, warmup: int) -> dict:
    """Step times and losses on one repeated batch and draw."""
    params = list(model.method.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=lr)
    noise = diffusion.draw_noise(batch, model.backbone.mask_token_id, "linear", 1e-3, seeded(0, 2))
    weights = diffusion.token_loss_weights(batch, noise, "linear")
    model.method.train()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    losses, times = [], []
    for _ in range(warmup + steps):
        sync(model.device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_backward(model, batch, noise, weights, None, 2048)
        optimizer.step()
        sync(model.device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if model.device.type == "cuda" else None
    step_s = statistics.median(times[warmup:])
    tokens = batch.input_ids.numel()
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "peak_gib": peak, "losses": losses,
            "masked_fraction": float(noise.masked.sum()) / tokens}


@torch.no_grad()
def sampler_step_s(model: StepModel, batch, repeats: int = 3) -> dict:
    """One denoising step (every response position masked, t = 1) with the module and without."""
    model.method.eval()
    noisy = torch.where(batch.response_mask, torch.full_like(batch.input_ids, model.backbone.mask_token_id),
                        batch.input_ids)
    t = torch.ones(batch.input_ids.shape[0], device=model.device)

    def timed():
        out = []
        for _ in range(repeats + 1):
            sync(model.device)
            t0 = time.perf_counter()
            denoise(model, noisy, batch.attention_mask, batch.response_mask, t)
            sync(model.device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out[1:])
    with_module = timed()
    with model.method.switched_off():
        base = timed()
    return {"sampler_step_s": with_module, "sampler_step_base_s": base}


def run_variant(source: str, name: str, sets: dict, policy: str, checkpointing: bool, size: dict,
                device: torch.device) -> dict:
    backbone = standin.build_standin(source, device=device, dtype=torch.bfloat16, seed=0)
    config = config_lib.from_dict({}, {**sets, "train.precision": policy,
                                       "train.gradient_checkpointing": checkpointing})
    torch.manual_seed(0)
    model = StepModel(attach(config, backbone, policy, device), backbone, policy, device)
    batch = random_batch(backbone.vocab_size, backbone.mask_token_id, size["batch"], size["length"], device)
    out = {"variant": name, "precision": policy, "checkpointing": checkpointing,
           **train_variant(model, batch, config.train.lr, size["steps"], size["warmup"])}
    out["flops_per_token"] = flops_per_token(model, size["length"], out["masked_fraction"])
    out.update(sampler_step_s(model, batch))
    model.method.remove()
    del model, backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def summarize(rows: list[dict], peak: float | None) -> dict:
    """The issue's targets from the rows: ratios and model FLOP utilisation."""
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak if peak else None
        r["loss_falls"] = all(map(math.isfinite, r["losses"])) and r["losses"][-1] < r["losses"][0]
    return {"bf16_over_fp32_step": by["lora ckpt"]["step_s"] / by["lora ckpt fp32"]["step_s"],
            "trajectory_over_lora_step": by["trajectory"]["step_s"] / by["lora"]["step_s"],
            "lora_mfu": by["lora"]["mfu"], "all_losses_fall": all(r["loss_falls"] for r in rows)}


def run(size_name: str = "gpu", source: str = "llada-8b", out: str | None = None) -> dict:
    size = SIZES[size_name]
    device = torch.device("cuda" if size_name == "gpu" else "cpu")
    if size_name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here (--size tiny runs the CPU smoke version)")
    with tempfile.TemporaryDirectory() as tmp:
        if size_name == "tiny":
            source = str(Path(tmp))
            (Path(tmp) / "config.json").write_text(json.dumps(TINY_LLADA))
        _, facts = standin.read_config(source)
        layers = facts.get("n_layers") or facts["num_hidden_layers"]
        rows = [run_variant(source, name, sets, policy, ckpt, size, device)
                for name, sets, policy, ckpt in variants(layers)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = next((v for k, v in BF16_PEAK.items() if gpu and k in gpu), None)
    result = {"device": gpu or "cpu", "bf16_peak_flops": peak, "backbone": source if size_name == "gpu" else "tiny",
              **size, "variants": rows, "summary": summarize(rows, peak), "torch": torch.__version__}
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}, {result['backbone']}, batch {result['batch']} x {result['length']}")
    print(f"{'variant':18s} {'step s':>8s} {'tok/s':>9s} {'peak GiB':>9s} {'MFU':>6s} "
          f"{'sampler s':>10s} {'base s':>8s} loss first -> last")
    for r in result["variants"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
        print(f"{r['variant']:18s} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {peak:>9s} {mfu:>6s} "
              f"{r['sampler_step_s']:10.4f} {r['sampler_step_base_s']:8.4f} "
              f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    print(json.dumps(result["summary"]))


def main(argv: list[str] | None = None, prog: str = "lora-diffusion gpu-check") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="gpu",
                   help="gpu: LLaDA-8B shapes on the GPU; tiny: a tiny LLaDA on the CPU (smoke test)")
    p.add_argument("--backbone", default="llada-8b",
                   help=f"a shipped config ({', '.join(standin.shipped_names())}) or a model directory")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    result = run(args.size, args.backbone, args.out)
    print_table(result)
    return 0 if result["summary"]["all_losses_fall"] else 1
