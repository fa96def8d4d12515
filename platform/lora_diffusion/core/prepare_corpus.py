"""Unlabelled text for `prepare-backbone`: the raw texts of the task corpora, cut into windows.

Training text is the TRAIN split of each corpus, held-out text its VALIDATION split (test is
never read). The text is `Example.text`, the source text itself (SST-2 sentence, AG News title +
description, XQuAD context, XSum document), never the classification template or a label.
SST-2's train rows are phrases cut from its sentences: only the phrases that are no span of
another one are kept, so each sentence is read once rather than once per phrase.

Training windows pack consecutive texts of one corpus, separated by [SEP], into rows of exactly
`max_length` positions (no padding); separators are never masked. Held-out windows are one per
text (its first `max_length - 2` tokens), so held-out figures are on real text only.
"""

from __future__ import annotations

import torch

from . import splits, tasks
from .diffusion import Batch

CORPORA = ("sst2", "ag_news", "xquad", "xsum")


def corpus_texts(task: str, split: str, data_dir: str | None,
                 limit: int | None = None, seed: int = 0) -> list[str]:
    """The distinct raw texts of one split of one corpus, in file order."""
    examples = tasks.load_split(task, split, data_dir, max_examples=limit, seed=seed)
    texts = list(dict.fromkeys(e.text for e in examples if e.text.strip()))
    if task == "sst2" and split == "train":  # phrases of sentences: keep the maximal ones
        keep = set(splits._maximal(set(texts)))
        texts = [t for t in texts if t in keep]
    return texts


def training_and_heldout_texts(corpora, data_dir, heldout_per_corpus: int, seed: int):
    """{corpus: train texts}, {corpus: held-out texts}; a held-out text that is also a training
    text (none in the shipped splits) is dropped from held-out, so it is never scored."""
    train = {c: corpus_texts(c, "train", data_dir) for c in corpora}
    seen = {t for texts in train.values() for t in texts}
    heldout = {c: [t for t in corpus_texts(c, "validation", data_dir, heldout_per_corpus, seed)
                   if t not in seen] for c in corpora}
    return train, heldout


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def pack_windows(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Texts joined by [SEP] and cut into windows of max_length - 2 tokens (room for [CLS] and
    the closing [SEP]); the last, shorter window is kept."""
    width = max_length - 2
    stream: list[int] = []
    for ids in _token_ids(tokenizer, texts):
        stream += [*ids, tokenizer.sep_token_id]
    return [stream[i:i + width] for i in range(0, len(stream), width) if stream[i:i + width]]


def first_windows(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """One window per text: its first max_length - 2 tokens."""
    return [ids[: max_length - 2] for ids in _token_ids(tokenizer, texts) if ids]


def window_batch(tokenizer, windows: list[list[int]], prefix: int = 0) -> Batch:
    """[CLS] window [SEP], right-padded. Diffusion acts on every token of the window except
    separators and its first `prefix` tokens (kept clean: a prompt, for completion samples)."""
    width = max(len(w) for w in windows) + 2
    ids = torch.full((len(windows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, w in enumerate(windows):
        row = [tokenizer.cls_token_id, *w, tokenizer.sep_token_id]
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    inner = attention.bool()
    inner[:, 0] = False
    inner &= ids != tokenizer.sep_token_id
    inner[:, : 1 + prefix] = False
    prompt = attention.bool() & ~inner & (torch.arange(width) > 0)[None, :]
    prompt &= ids != tokenizer.sep_token_id
    return Batch(ids, attention, inner, prompt)
