"""Metrics of the generation tasks: SQuAD v1.1 exact match / F1 (xquad) and ROUGE-1/2/L F1
(xsum), all in [0, 1] and averaged over examples. Classification accuracy is `tasks.accuracy`.

The SQuAD normaliser and F1 are the official v1.1 evaluation script's (no maintained package
with it is installed here: Hugging Face `evaluate` loads its metrics from the hub); ROUGE is
Google's `rouge-score` package, the implementation published XSum numbers use.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _squad_normalize(text: str) -> str:
    """SQuAD v1.1 evaluate script: lowercase, drop punctuation, articles, extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1(prediction: str, reference: str) -> float:
    pred, ref = _squad_normalize(prediction).split(), _squad_normalize(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1_em(prediction: str, references) -> tuple[float, float]:
    """(F1, exact match) in [0, 1], each the max over the references, as in SQuAD v1.1."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("squad_f1_em: no references")
    f1 = max(_squad_f1(prediction, r) for r in refs)
    em = max(float(_squad_normalize(prediction) == _squad_normalize(r)) for r in refs)
    return f1, em


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Porter-stemmed, as the XSum papers score (rouge-score's default tokenizer: lowercased
    # alphanumeric tokens)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, references) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction, the best reference per type (sentence-level LCS)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge: no references")
    scores = _rouge_scorer().score_multi(refs, prediction)
    return {k: scores[k].fmeasure for k in ROUGE_TYPES}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (sentence-level LCS, lowercased, alphanumeric tokens, Porter-stemmed)."""
    return rouge(prediction, reference)["rougeL"]


def score_generations(metric_family: str, predictions: list[str], references: list) -> dict[str, float]:
    """Mean metrics over examples: "squad" -> exact_match, f1; "rouge" -> rouge1, rouge2, rougeL."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"score_generations: {len(predictions)} predictions for {len(references)} references")
    if metric_family == "squad":
        f1, em = zip(*(squad_f1_em(p, r) for p, r in zip(predictions, references)))
        return {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1)}
    if metric_family == "rouge":
        rows = [rouge(p, r) for p, r in zip(predictions, references)]
        return {k: sum(row[k] for row in rows) / len(rows) for k in ROUGE_TYPES}
    raise ValueError(f"unknown metric family {metric_family!r}")
