"""An external labelled SST-2 file from training rows a run never trains on.

GLUE's SST-2 test labels are not public, so to check that dev accuracy carries over to other
data we write, in GLUE format (`sentence<TAB>label`), train rows outside the run's seeded
training subset (`max_train_examples`, `train.seed`), dropping any sentence whose text also
occurs in that subset (SST-2 train has duplicate rows). Train rows are phrases of any length;
keeping rows of at least `min_words` words makes them closer to the sentence-level dev set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import tasks
from .task_specs import get_task
from .errors import UserError


def write_sst2_heldout(path: str, max_train_examples: int, seed: int = 0, n: int = 872,
                       min_words: int = 8, data_dir: str | None = None) -> dict:
    full = tasks.load_split("sst2", "train", data_dir)
    if max_train_examples >= len(full):
        raise UserError(f"max_train_examples: {max_train_examples} leaves no SST-2 train row held out")
    used = tasks.load_split("sst2", "train", data_dir, max_examples=max_train_examples, seed=seed)
    used_ids = {e.id for e in used}
    used_text = {_sentence(e) for e in used}
    pool = [e for e in full if e.id not in used_ids and _sentence(e) not in used_text
            and len(_sentence(e).split()) >= min_words]
    pool.sort(key=lambda e: hashlib.sha256(f"heldout:{seed}:{e.id}".encode()).hexdigest())
    rows = pool[:n]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["sentence\tlabel"] + [f"{_sentence(e)}\t{e.label}" for e in rows]
    out.write_text("\n".join(lines) + "\n")
    return {"path": str(out), "rows": len(rows), "pool": len(pool), "min_words": min_words,
            "excluded_training_rows": len(used_ids), "seed": seed}


def _sentence(example) -> str:
    """The raw sentence back out of the filled template."""
    template = get_task("sst2").template
    head, tail = template.split("{sentence}")
    return example.prompt[len(head): len(example.prompt) - len(tail)]
