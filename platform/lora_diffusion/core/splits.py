"""Fixed train / validation / test cuts of each task's rows.

Every cut is a pure function of the data: rows are ranked by a hash seeded with SPLIT_SEED, never
the run seed, so the three splits are the same for every seed and trial and do not depend on the
order of the rows. Each split keeps the rows' file order.

    sst2     test = the GLUE dev file; validation = whole training *sentences*, and every training
             phrase contained in one of them is dropped from train (see `sst2_cut`)
    ag_news  test, validation, train: stratified cuts (per class) of the AG News test.csv
    xquad    test, validation, train: cuts by article, so no context is in two splits
    xsum     test, validation, train: cuts by id (the two local files share ids, deduplicated)
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from .overlap import normalise

SPLIT_SEED = 0  # fixed: the cuts below must not depend on the run seed
SPLITS = ("train", "validation", "test")
SST2_VALIDATION_FRACTION = 0.125  # of the training sentences: 861 of 6,885, about GLUE dev's 872
# Fractions to test and validation; the rest is train. AG News: of each class (1,900 rows per
# class: 475 to test, the same rows the old dev cut took, and 238 to validation). XQuAD: of the
# articles. XSum: of the ids.
FRACTIONS = {"ag_news": {"test": 0.25, "validation": 0.125},
             "xquad": {"test": 0.2, "validation": 0.1},
             "xsum": {"test": 0.2, "validation": 0.1}}


def stable_rank(key: str, seed: int) -> str:
    """A seeded, order-independent sort key (Python's hash() is salted per process)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def cut(task: str, rows) -> dict[str, tuple]:
    """split name -> its Examples, from (Example, group) rows (task_readers.Rows)."""
    if task == "sst2":
        return sst2_cut(rows)
    by_group = defaultdict(list)
    for ex, group in rows:
        by_group[group].append(ex.id)
    split_of = {}
    if task == "ag_news":  # group = class: a fixed count per class to test, then validation
        for ids in by_group.values():
            ranked = sorted(ids, key=lambda i: stable_rank(i, SPLIT_SEED))
            split_of.update(zip(ranked, _labels(FRACTIONS[task], len(ranked))))
    else:  # group = article or id: a fraction of the groups to test, then validation
        groups = sorted(by_group, key=lambda g: stable_rank(str(g), SPLIT_SEED))
        for group, split in zip(groups, _labels(FRACTIONS[task], len(groups))):
            split_of.update(dict.fromkeys(by_group[group], split))
    return {s: tuple(ex for ex, _ in rows if split_of[ex.id] == s) for s in SPLITS}


def _labels(fractions: dict[str, float], n: int) -> list[str]:
    """The split of each of n ranked items: the first round(fraction * n) to test, the next to
    validation, the rest to train."""
    head = [s for s in ("test", "validation") for _ in range(round(fractions[s] * n))]
    return head[:n] + ["train"] * (n - len(head))


def sst2_cut(rows) -> dict[str, tuple]:
    """SST-2's training rows are phrases cut from sentences (the parse-tree constituents), so a
    random set of rows shares most of its text with the rest. The rows contained in no other row
    are the sentences; SST2_VALIDATION_FRACTION of them (one row per text) form validation, as
    GLUE dev is sentences; every row whose text is a whole-word span of a validation sentence is
    dropped from train (including short common phrases such as "the film": a phrase can belong
    to many sentences). test is the GLUE dev file. About 1 s for the 67k phrases."""
    train_rows = [ex for ex, group in rows if group == "train"]
    texts = {}
    for ex in train_rows:
        texts.setdefault(normalise(ex.text), ex)
    sentences = [texts[t] for t in _maximal(texts)]
    sentences.sort(key=lambda ex: stable_rank(ex.id, SPLIT_SEED))
    validation = sentences[:round(SST2_VALIDATION_FRACTION * len(sentences))]
    inside = {s for ex in validation for s in word_spans(normalise(ex.text)) if s in texts}
    keep = {ex.id for ex in validation}
    return {"train": tuple(ex for ex in train_rows if normalise(ex.text) not in inside),
            "validation": tuple(ex for ex in train_rows if ex.id in keep),
            "test": tuple(ex for ex, group in rows if group == "dev")}


def _maximal(texts) -> list[str]:
    """The texts that are no whole-word span of another text. Longest first: a text inside
    another is inside a maximal one, whose spans were marked before the text is reached."""
    covered, maximal = set(), []
    for t in sorted(texts, key=lambda t: (-t.count(" "), t)):
        if t in covered:
            continue
        maximal.append(t)
        covered.update(s for s in word_spans(t) if s in texts)
    return maximal


def word_spans(text: str):
    """Every contiguous run of whole words of a normalised text (the text itself included)."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == " "]
    ends = [i for i, c in enumerate(text) if c == " "] + [len(text)]
    for a in starts:
        for b in ends:
            if b > a:
                yield text[a:b]
