"""Overlap of an evaluation set with a run's training rows: exact and containment.

Texts are compared after a light normalisation (lowercase, runs of whitespace to one space) and
as whole words: "bad" is inside "not bad at all", not inside "badly". An evaluation row overlaps
training when its text

    equals a training row's text, or
    is contained in a training row's text (the model trained on all of it), or
    contains a training row that makes up more than half of its words.

The last rule has a floor because SST-2's training rows are phrases down to single words: 840 of
the 872 GLUE dev sentences contain some training phrase ("bad", "at its best"), which is
language, not leakage; a training phrase that is most of the row is. What each task compares
(sentence, article text, XQuAD context, XSum document) is `Example.text`.

Speed: the training side is indexed once (a set of rows, their concatenation for substring
search, and rows keyed by their first words); each evaluation text then costs one substring
search and a few dict look-ups per word. SST-2 (measured, CPU time): index of the 57,626
training phrases 0.16 s, 872 test sentences 0.8 s, 861 validation sentences 0.8 s.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from .errors import UserError

MAX_OVERLAP = 0.01  # above this fraction of overlapping rows an evaluation file is refused
HEAD_WORDS = 3  # training rows are keyed by up to their first 3 words


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


class TrainingText:
    """The normalised texts of a run's training rows, indexed for the three overlap rules."""

    def __init__(self, texts):
        self.rows = frozenset(normalise(t) for t in texts)
        # each row padded with spaces: " x " found inside means x is a whole-word span of a row
        self.joined = "\n".join(f" {t} " for t in self.rows)
        self.by_head: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for t in self.rows:
            words = t.split(" ")
            self.by_head[" ".join(words[:HEAD_WORDS])].append((t, len(words)))

    def overlaps(self, text: str) -> bool:
        t = normalise(text)
        return t in self.rows or f" {t} " in self.joined or self._contains_most(t)

    def _contains_most(self, text: str) -> bool:
        """Whether a training row spans more than half of `text`'s words, as whole words."""
        words = text.split(" ")
        n = len(words)
        starts = [0]
        for w in words[:-1]:
            starts.append(starts[-1] + len(w) + 1)
        for i in range(n):
            if n - i <= n // 2:  # a span starting here has at most half the words
                break
            for k in range(1, HEAD_WORDS + 1):
                if i + k > n:
                    break
                for row, length in self.by_head.get(" ".join(words[i:i + k]), ()):
                    if length > n // 2 and i + length <= n and text.startswith(row, starts[i]) \
                            and (i + length == n or text[starts[i] + len(row)] == " "):
                        return True
        return False


def overlap_fraction(examples, training: TrainingText) -> float:
    """Fraction of `examples` whose text overlaps the training rows (each distinct text once)."""
    if not examples:
        return 0.0
    verdict = {}
    for ex in examples:
        if ex.text not in verdict:
            verdict[ex.text] = training.overlaps(ex.text)
    return sum(verdict[ex.text] for ex in examples) / len(examples)


def check_overlap(name: str, examples, training: TrainingText, allow: bool) -> float:
    """The overlap fraction of an evaluation set; above MAX_OVERLAP a UserError naming the set,
    unless `allow` (the caller then reports the fraction beside the metric)."""
    return _refuse(name, examples, overlap_fraction(examples, training), allow)


def _refuse(name: str, examples, fraction: float, allow: bool) -> float:
    if fraction > MAX_OVERLAP and not allow:
        raise UserError(f"{name}: {fraction:.1%} of its {len(examples)} rows overlap the run's "
                        f"training rows (exact or containment; limit {MAX_OVERLAP:.0%}); evaluate "
                        "a file disjoint from training, or pass --allow-overlap (allow_overlap: true)")
    return fraction


def check_overlaps(sets, train_texts: list[str], allow: bool) -> dict[str, float]:
    """`check_overlap` of each (split, name, examples) against the training texts, each fraction
    stored per node (core/node_cache.py) under a digest of the texts compared and of this
    module: SST-2's check costs seconds and every trial of a sweep repeats it."""
    from . import node_cache

    train_key, index = _texts_key(train_texts), []

    def fraction(examples) -> float:
        if not index:  # built only when some fraction is not stored yet
            index.append(TrainingText(train_texts))
        return overlap_fraction(examples, index[0])

    out = {}
    for split, name, examples in sets:
        key = node_cache.key_of(train_key, _texts_key(e.text for e in examples),
                                node_cache.code_digest("overlap.py"))
        stored = node_cache.cached("overlap", key, lambda examples=examples: fraction(examples))
        out[split] = _refuse(name, examples, stored, allow)
    return out


def _texts_key(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()
