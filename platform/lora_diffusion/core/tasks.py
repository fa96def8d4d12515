"""Task data: loading, fixed train/dev splits, seeded subsets, label words and accuracy.

Four tasks, each read from local copies under a data directory (see /work/shared/data/README.md)
or, only when asked, from the Hugging Face hub:

    sst2     classification  GLUE SST-2 train.tsv / dev.tsv
    ag_news  classification  AG News test.csv, cut into train/dev here (no local train.csv)
    xquad    generation      XQuAD-en (a SQuAD v1.1 dev subset), cut into train/dev by article
    xsum     generation      two 1,000-row XSum test subsets, deduplicated, cut into train/dev by id

Every split is a pure function of the data: it uses a fixed seed (SPLIT_SEED), never the run seed,
so train/dev never move between runs and train accuracy can't leak into dev numbers. Example ids
are "<task>/..." strings, unique across a task's splits, so leakage is checkable by set
intersection. What each task is (templates, label words, row -> Example): task_specs.py; the file
formats and the hub: task_readers.py; generation metrics: metrics.py.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from .errors import UserError
from .task_readers import FOLDERS, HUB, LOCAL_FILES, Rows, read_data_file, read_hub, read_local
from .task_specs import Example, TaskSpec, get_task

DATA_DIR_ENV = "LORA_DIFFUSION_DATA_DIR"
SPLIT_SEED = 0  # fixed: the train/dev cuts below must not depend on the run seed
AG_NEWS_DEV_PER_CLASS = 475  # 4 x 475 = 1,900 dev rows, the rest train
XQUAD_DEV_FRACTION = 0.2  # of articles (titles), so contexts never leak between splits
XSUM_DEV_FRACTION = 0.2  # of unique ids


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
    names = LOCAL_FILES[task].get(split, LOCAL_FILES[task].get("*"))
    paths = [root / FOLDERS[task] / n for n in names] if root is not None else []
    missing = [p for p in paths if not p.is_file()]
    if paths and not missing:
        rows = read_local(task, split, tuple(str(p) for p in paths))
    elif not allow_hub:
        raise UserError(f"data_dir: {_where(task, missing)}; set {DATA_DIR_ENV} or data_dir "
                        f"to the folder holding {FOLDERS[task]}/, or allow_hub")
    else:
        try:
            rows = read_hub(task, split)
        except Exception as e:  # no network, no hub cache, renamed dataset: all user-fixable
            raise UserError(f"data_dir: {_where(task, missing)}, and the hub dataset "
                            f"{HUB[task][0]} could not be loaded ({type(e).__name__}: {e})") from e
    if task == "sst2":  # ships one file per split: nothing to cut
        return [ex for ex, _ in rows]
    dev = _dev_ids(task, rows)
    return [ex for ex, _ in rows if (ex.id in dev) == (split == "dev")]


def check_local_data(task: str, data_dir: str | None, allow_hub: bool) -> None:
    """The UserError `load_split` would raise on a worker for missing local files, raised here:
    the sweep calls it before Ray starts, so a wrong data_dir fails once, not in every trial."""
    if allow_hub:
        return
    root = resolve_data_dir(data_dir)
    paths = [root / FOLDERS[task] / n for names in LOCAL_FILES[task].values() for n in names] \
        if root is not None else []
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise UserError(f"data_dir: {_where(task, missing)}; set {DATA_DIR_ENV} or data_dir "
                        f"to the folder holding {FOLDERS[task]}/, or allow_hub")


def _where(task: str, missing: list[Path]) -> str:
    if missing:
        return f"missing file {missing[0]} for task {task!r}"
    return f"no data directory configured for task {task!r} (data_dir and ${DATA_DIR_ENV} unset)"


# ----------------------------------------------------------------------------------------------
# Fixed train/dev cuts (SPLIT_SEED, independent of the run seed and of the order of the rows)


def _stable_rank(key: str, seed: int) -> str:
    """A seeded, order-independent sort key (Python's hash() is salted per process)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _dev_ids(task: str, rows: Rows) -> set[str]:
    """ag_news: 475 ids per class (group = label). xquad (group = article) and xsum
    (group = id): every id of the first 20% of groups, ranked by a SPLIT_SEED hash."""
    by_group = defaultdict(list)
    for ex, group in rows:
        by_group[group].append(ex.id)
    if task == "ag_news":
        return {i for ids in by_group.values()
                for i in sorted(ids, key=lambda i: _stable_rank(i, SPLIT_SEED))[:AG_NEWS_DEV_PER_CLASS]}
    groups = sorted(by_group, key=lambda g: _stable_rank(str(g), SPLIT_SEED))
    frac = XQUAD_DEV_FRACTION if task == "xquad" else XSUM_DEV_FRACTION
    return {i for g in groups[:round(frac * len(groups))] for i in by_group[g]}


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
