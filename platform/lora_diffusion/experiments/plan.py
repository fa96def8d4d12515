"""The `plan` verb: the memory plan of one configuration (core/memory_plan.py), or the table of the
shipped real-size configs, before any trial starts; `--measure` runs the configuration's steps on
this machine and prints their measured peak beside the prediction (the plan's CPU check)."""

from __future__ import annotations

import argparse

from ..core import config as config_lib, memory_plan, standin


def plans(args) -> tuple[list, object]:
    """The plans the arguments ask for (each backbone x method), and the config they start from."""
    config = config_lib.load(args.config, args.set)
    overrides = {"precision": args.precision, "micro_batch_size": args.micro_batch_size,
                 "gradient_checkpointing": {"on": True, "off": False}.get(args.gradient_checkpointing)}
    sources = standin.shipped_names() if args.table else [args.backbone]
    methods = args.methods.split(",") if args.methods else [config.method]
    out = []
    for source in sources:
        for method in methods:
            config.method = method
            out.append(memory_plan.plan(config, source=source, gpu_memory_gib=args.gpu_memory_gib,
                                        workers=args.workers, device_type=args.device,
                                        response_tokens=args.response_tokens, overrides=overrides))
    return out, config


def run(args) -> int:
    """The memory plan (core/memory_plan.py): one trial's bytes per worker and its GPU placement."""
    planned, config = plans(args)
    if args.table:
        print(memory_plan.table(planned))
    else:
        for p in planned:
            print(memory_plan.describe(p), end="\n\n")
    if args.measure:  # the plan checked: this config's real steps on this machine (CPU)
        from ..core.memory_trace import measured_peak
        from ..core.recipe import Recipe

        measured = measured_peak(Recipe(config), steps=args.measure)
        print(f"measured peak over {args.measure} steps {measured / 2**20:.1f} MiB, predicted "
              f"{planned[-1].peak / 2**20:.1f} MiB ({planned[-1].peak / measured - 1:+.1%})")
    return 0


def main(argv: list[str] | None = None, prog: str = "lora-diffusion plan") -> int:
    return run(parser(prog).parse_args(argv))


def parser(prog: str = "lora-diffusion plan") -> argparse.ArgumentParser:
    m = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    m.add_argument("--config", help="YAML/JSON config file (its method, batch, length, precision)")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. lora.rank=32")
    m.add_argument("--backbone", help="a shipped config (llada-8b, dream-7b, modernbert-large, mdlm-owt), a model "
                                      "directory or config.json (default: the configured backbone)")
    m.add_argument("--table", action="store_true", help="a markdown table of the four shipped configs")
    m.add_argument("--methods", help="comma-separated methods planned in turn (default: the configured one)")
    m.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    m.add_argument("--workers", type=int, default=1, help="data-parallel workers sharing train.batch_size")
    m.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what train.precision=auto resolves for")
    m.add_argument("--response-tokens", type=int, help="response tokens a row (default: the task's)")
    m.add_argument("--precision", choices=("auto", "fp32", "bf16-mixed", "bf16"), help="overrides train.precision")
    m.add_argument("--gradient-checkpointing", choices=("on", "off"), help="overrides train.gradient_checkpointing")
    m.add_argument("--micro-batch-size", type=int, help="overrides train.micro_batch_size")
    m.add_argument("--measure", type=int, metavar="STEPS", help="also run STEPS training steps of the "
                   "config here and print their measured peak tensor memory beside the plan's (CPU)")
    return m
