"""Metrics of the generation tasks: SQuAD v1.1 F1 / exact match (xquad) and ROUGE-L (xsum).
Classification accuracy is `tasks.accuracy`."""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache


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
    # The `rouge-score` package (Google's reference implementation used for published XSum
    # numbers), with the Porter stemmer as those papers use it. It is not in pyproject yet.
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("rouge_l needs the rouge-score package: pip install rouge-score") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (sentence-level LCS, lowercased, alphanumeric tokens, Porter-stemmed)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure
