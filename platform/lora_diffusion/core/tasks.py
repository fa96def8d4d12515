"""Task data: loading, the fixed train/validation/test splits, seeded subsets, label words and
accuracy.

Four tasks, each read from local copies under a data directory (see /work/shared/data/README.md)
or, only when asked, from the Hugging Face hub:

    sst2     classification  GLUE SST-2 train.tsv (train, validation by sentence) / dev.tsv (test)
    ag_news  classification  AG News test.csv, cut into train/validation/test here (no train.csv)
    xquad    generation      XQuAD-en (a SQuAD v1.1 dev subset), cut by article
    xsum     generation      two 1,000-row XSum test subsets, deduplicated, cut by id

Every split is a pure function of the data (splits.py: a fixed SPLIT_SEED, never the run seed),
so the splits never move between runs: selection sees validation, reports see test. Example ids
are "<task>/..." strings, unique across a task's splits, so leakage is checkable by set
intersection; text overlap with training is checked by overlap.py. What each task is (templates,
label words, row -> Example): task_specs.py; the file formats and the hub: task_readers.py;
generation metrics: metrics.py.
"""

from __future__ import annotations

import os
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from . import splits
from .errors import UserError
from .splits import stable_rank as _stable_rank
from .task_readers import FOLDERS, HUB, LOCAL_FILES, read_data_file, read_hub, read_local
from .task_specs import Example, TaskSpec, get_task

DATA_DIR_ENV = "LORA_DIFFUSION_DATA_DIR"


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """Explicit setting, else $LORA_DIFFUSION_DATA_DIR, else None (no local data configured)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


# ----------------------------------------------------------------------------------------------
# Public loader


def load_split(task: str, split: str, data_dir: str | None = None, *, data_file: str | None = None,
               max_examples: int | None = None, seed: int = 0,
               allow_hub: bool = False) -> list[Example]:
    """Examples of one split, in file order; a seeded subset if max_examples is set.

    With data_file, the whole file (in the task's own format) is returned and `split` only
    documents what it is; ids are then "<task>/<basename>/<row>".
    """
    spec = get_task(task)
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise UserError(f"max_examples: must be a positive integer, got {max_examples!r}")
    if data_file is not None:
        examples = list(read_data_file(task, data_file))
    else:
        if split not in spec.splits:
            raise UserError(f"split: task {task!r} has splits {', '.join(spec.splits)} locally, "
                            f"not {split!r}; evaluate other files with data_file")
        examples = _load_task(task, split, data_dir, allow_hub)
    if max_examples is not None:
        examples = _subset(examples, max_examples, seed, spec.kind == "classification")
    return examples


def _load_task(task: str, split: str, data_dir: str | None, allow_hub: bool) -> list[Example]:
    """One split: read the task's local files (else, if allowed, its hub copy) and cut it."""
    root = resolve_data_dir(data_dir)
    paths = [root / FOLDERS[task] / n for n in LOCAL_FILES[task]] if root is not None else []
    missing = [p for p in paths if not p.is_file()]
    if paths and not missing:
        return list(_cut(task, tuple(str(p) for p in paths))[split])
    if not allow_hub:
        raise UserError(f"data_dir: {_where(task, missing)}; set {DATA_DIR_ENV} or data_dir "
                        f"to the folder holding {FOLDERS[task]}/, or allow_hub")
    try:
        return list(_cut(task, None)[split])
    except UserError:
        raise
    except Exception as e:  # no network, no hub cache, renamed dataset: all user-fixable
        raise UserError(f"data_dir: {_where(task, missing)}, and the hub dataset "
                        f"{HUB[task][0]} could not be loaded ({type(e).__name__}: {e})") from e


@lru_cache(maxsize=8)  # the SST-2 cut takes about a second; a run loads three splits
def _cut(task: str, paths: tuple[str, ...] | None) -> dict[str, tuple[Example, ...]]:
    """All splits of a task, from its local files (or the hub copy when paths is None). A local
    cut is stored per node under the digests of its files and of the code that cuts them
    (core/node_cache.py): every sweep trial is a new process and would cut it again."""
    if not paths:
        return splits.cut(task, read_hub(task))  # the datasets library caches the hub copy
    from . import node_cache

    key = node_cache.key_of(task, [node_cache.file_digest(p) for p in paths],
                            node_cache.code_digest("splits.py", "task_readers.py", "task_specs.py"))
    return node_cache.cached("splits", key, lambda: splits.cut(task, read_local(task, paths)))


def check_local_data(task: str, data_dir: str | None, allow_hub: bool) -> None:
    """The UserError `load_split` would raise on a worker for missing local files, raised here:
    the sweep calls it before Ray starts, so a wrong data_dir fails once, not in every trial."""
    if allow_hub:
        return
    root = resolve_data_dir(data_dir)
    paths = [root / FOLDERS[task] / n for n in LOCAL_FILES[task]] if root is not None else []
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise UserError(f"data_dir: {_where(task, missing)}; set {DATA_DIR_ENV} or data_dir "
                        f"to the folder holding {FOLDERS[task]}/, or allow_hub")


def _where(task: str, missing: list[Path]) -> str:
    if missing:
        return f"missing file {missing[0]} for task {task!r}"
    return f"no data directory configured for task {task!r} (data_dir and ${DATA_DIR_ENV} unset)"


# ----------------------------------------------------------------------------------------------
# Seeded subsets


def _subset(examples: list[Example], n: int, seed: int, stratify: bool) -> list[Example]:
    """n examples chosen by a seeded hash of their ids (same seed -> same rows), kept in file
    order; for classification each class gets its share (largest remainder)."""
    if n >= len(examples):
        return examples
    by_class = defaultdict(list)
    for ex in examples:
        by_class[ex.label if stratify else None].append(ex)
    exact = {c: n * len(v) / len(examples) for c, v in by_class.items()}
    quota = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], str(c)))[:n - sum(quota.values())]:
        quota[c] += 1
    keep = {ex.id for c, v in by_class.items()
            for ex in sorted(v, key=lambda ex: _stable_rank(ex.id, seed))[:quota[c]]}
    return [ex for ex in examples if ex.id in keep]


# ----------------------------------------------------------------------------------------------
# Label words and metrics


def label_word_token_ids(spec: TaskSpec, tokenizer) -> list[list[int]]:
    """Token ids of each label word as it follows the prompt ("...Sentiment: great"): with a
    leading space (BPE tokenizers mark it; WordPiece ignores it), without special tokens."""
    if spec.kind != "classification" or not spec.label_words:
        raise UserError(f"task: {spec.name!r} is a {spec.kind} task and has no label words")
    ids = [list(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in spec.label_words]
    for word, word_ids in zip(spec.label_words, ids):
        if not word_ids:
            raise UserError(f"task: label word {word!r} of {spec.name!r} tokenizes to nothing")
    return ids


def accuracy(predictions: list[int], examples: list[Example]) -> float:
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(examples)} examples")
    if any(ex.label is None for ex in examples):
        raise ValueError("accuracy: examples without labels (a generation task?)")
    return sum(int(p) == ex.label for p, ex in zip(predictions, examples)) / len(examples)
