"""Sizes of every task's splits and each evaluation set's overlap with its training rows, timed.

    python jobs/split_overlap.py                                   # all four tasks
    python jobs/split_overlap.py --task ag_news --data-file ../shared/data/ag_news/test.csv

Overlap is what a run checks before it evaluates (core/overlap.py: exact, inside a training row,
or mostly a training row, as whole words); here against the whole train split.
"""

import argparse
import sys
import time

from lora_diffusion.core import overlap, tasks
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.task_specs import TASKS


def measure(task: str, data_file: str | None, data_dir: str | None) -> None:
    splits = {s: tasks.load_split(task, s, data_dir) for s in ("train", "validation", "test")}
    if data_file:
        splits[data_file] = tasks.load_split(task, "test", data_file=data_file)
    t0 = time.perf_counter()
    training = overlap.TrainingText(e.text for e in splits["train"])
    print(f"{task}: train {len(splits['train'])} rows, indexed in {time.perf_counter() - t0:.2f} s")
    for name, examples in splits.items():
        if name == "train":
            continue
        t0 = time.perf_counter()
        n = round(overlap.overlap_fraction(examples, training) * len(examples))
        print(f"  {name}: {len(examples)} rows, {n} overlap training ({n / len(examples):.1%}), "
              f"checked in {time.perf_counter() - t0:.2f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", help="default: every task")
    p.add_argument("--data-file", help="also check this file (in the task's format)")
    p.add_argument("--data-dir", help="default: $LORA_DIFFUSION_DATA_DIR")
    args = p.parse_args()
    try:
        for task in args.task or sorted(TASKS):
            measure(task, args.data_file, args.data_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
