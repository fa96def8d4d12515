"""Where trajectory modules should be injected (`lora-diffusion calibrate-injection`): accuracy
and step-time ratios of three placements side by side, in one process (benchmark.compare_variants).

Variants: last hidden state only, after the 3rd of 6 layers, after every layer; one phase so the
comparison isolates depth (add --set trajectory.num_phases=4 to repeat it with phases).
"""

from __future__ import annotations

VARIANTS = {
    "after layer 3 of 6": {"trajectory.injection_layers": [2]},
    "last hidden state": {"trajectory.injection_layers": [-1]},
    "after every layer": {"trajectory.injection_layers": [0, 1, 2, 3, 4, 5]},
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import argparse

    from ...core.config import parse_sets
    from .benchmark import compare_variants, markdown, write_markdown

    p = argparse.ArgumentParser(prog=prog, description=__doc__ + "\n    lora-diffusion calibrate-injection "
                                "--steps 400 --out runs/calibrate_injection.md\n",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-examples", type=int, default=None, help="validation subset (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/calibrate_injection.md")
    args = p.parse_args(argv)
    base = {"trajectory.num_phases": 1, "train.steps": args.steps, "train.eval_every": args.steps,
            "max_eval_examples": args.eval_examples, **parse_sets(args.set)}
    rows = compare_variants(base, VARIANTS)
    print(markdown(rows))
    write_markdown(args.out, base, rows)
    return 0
