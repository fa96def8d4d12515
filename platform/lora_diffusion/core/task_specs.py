"""What each task is: its examples' form (Example), prompt template, label words and split
note (TaskSpec, TASKS), and how one row of its data becomes an Example (one function per task,
shared by the local files, data_file and the hub). Loading and splitting: tasks.py.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from .errors import UserError

# XSum documents average ~2,000 characters; 1,500 (~330 WordPieces) leaves room for the
# ~30-token summary inside a 512-position BERT-style backbone. Cut at a word boundary.
XSUM_MAX_DOC_CHARS = 1500


@dataclass(frozen=True)
class Example:
    id: str  # "<task>/<file or split>/<row>" or "<task>/<dataset id>"; unique across splits
    prompt: str  # the filled template: the clean conditioning part
    response: str  # label word (classification) or answer / summary (generation)
    label: int | None  # class index for classification, None otherwise
    references: tuple[str, ...] = ()  # gold answers for generation tasks
    # the source text overlap with training is checked on (core/overlap.py): SST-2 sentence,
    # AG News title + description, XQuAD context, XSum document (before the length cap)
    text: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" or "generation"
    template: str
    label_words: tuple[str, ...]  # one per class index; single bert-base-uncased WordPieces
    splits: tuple[str, ...]
    split_note: str
    # what the sweep selects on (`validation/<metric>`) and, for generation, how it is scored:
    # "squad" (exact_match, f1) or "rouge" (rouge1, rouge2, rougeL), core/metrics.py
    metric: str = "accuracy"
    metric_family: str = "accuracy"
    # generation: the fixed response length, answer then end tokens (core/generation.py)
    response_tokens: int | None = None
    # a prompt too long for max_length keeps this many last tokens (the question and the cue) and
    # its start, cutting the middle; None: keeps its last tokens (diffusion.cut_prompt)
    prompt_tail: int | None = None


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        kind="classification",
        template="Review: {sentence}\nSentiment:",
        label_words=("terrible", "great"),  # 0 = negative, 1 = positive (LM-BFF's choice)
        splits=("train", "validation", "test"),
        split_note="train: GLUE SST-2 train phrases (67,349) less validation's; validation: 861 "
        "whole training sentences (fixed seed 0), every training phrase contained in one of them "
        "dropped from train (57,626 phrases left), so no validation sentence shares text with "
        "train; test: GLUE dev (= GLUE validation, 872 sentences)",
    ),
    "ag_news": TaskSpec(
        name="ag_news",
        kind="classification",
        template="Article: {text}\nTopic:",  # text = title + description
        label_words=("world", "sports", "business", "science"),  # World, Sports, Business, Sci/Tech
        splits=("train", "validation", "test"),
        split_note="train/validation/test are cuts (fixed seed 0, stratified by class) of the "
        "AG News test.csv (7,600 rows): test 1,900, validation 952, train 4,748; the test cut is "
        "not the official AG News test set: not comparable to published AG News numbers",
    ),
    "xquad": TaskSpec(
        name="xquad",
        kind="generation",
        template="Context: {context}\nQuestion: {question}\nAnswer:",
        label_words=(),
        splits=("train", "validation", "test"),
        split_note="train/validation/test cuts (fixed seed 0) of XQuAD-en, itself a SQuAD v1.1 "
        "dev subset, by article title so no context is in two splits: 20% of the 48 articles to "
        "test, 10% to validation; the hub copy has no titles and is cut by context instead; not "
        "comparable to published SQuAD/XQuAD numbers",
        metric="f1", metric_family="squad", response_tokens=16,  # 98% of answers fit (MiniLM WordPieces)
        prompt_tail=48,  # "Question: ... Answer:" is at most 36 MiniLM WordPieces in XQuAD-en
    ),
    "xsum": TaskSpec(
        name="xsum",
        kind="generation",
        template="Document: {document}\nSummary:",  # document capped at XSUM_MAX_DOC_CHARS
        label_words=(),
        splits=("train", "validation", "test"),
        split_note="train/validation/test cuts (fixed seed 0, 20% of unique ids to test, 10% to "
        "validation) of 1,910 unique XSum test-split articles (two 1,000-row subsets "
        "deduplicated on id); documents cut to "
        f"{XSUM_MAX_DOC_CHARS} characters; not comparable to published XSum test numbers",
        metric="rougeL", metric_family="rouge", response_tokens=32,  # 87% of summaries fit; longer ones are cut
        prompt_tail=8,  # the cue "Summary:" (2 MiniLM WordPieces): a cut document keeps its lead
    ),
}

def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"task: unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ----------------------------------------------------------------------------- what runs are selected on

# a generation task's ELBO bound on the reference response (core/generation.py): nats per token
ELBO_METRIC = "elbo_nats_per_token"
LOWER_IS_BETTER = (ELBO_METRIC, "loss")  # every other figure a run is selected or sorted on is a score
TEXT_SCORES = "generation.text_scores"  # the config key that makes a generation run ELBO-only


def run_metric(task: str, text_scores: bool = True) -> str:
    """What a run of `task` is selected on (`validation/<it>`): the task's metric (TaskSpec.metric),
    or the ELBO bound for a generation task run with generation.text_scores false (no generated
    text to score). Classification ignores text_scores."""
    spec = get_task(task)
    return ELBO_METRIC if spec.kind == "generation" and not text_scores else spec.metric


def metric_mode(metric: str) -> str:
    """"min" for a metric where lower is better (the ELBO bound, a loss), "max" for a score; the
    one place that says so. `metric` may carry its prefixes (`final/validation/f1`)."""
    return "min" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"


def oriented(metric: str, value: float) -> float:
    """`value` turned so that larger is better whatever `metric_mode` says: a key for max()."""
    return value if metric_mode(metric) == "max" else -value


def direction(metric: str) -> str:
    """The words a table or summary puts beside `metric`."""
    return "higher is better" if metric_mode(metric) == "max" else "lower is better"


def sst2_example(ex_id: str, sentence: str, label: int) -> Example:
    spec = TASKS["sst2"]
    sentence = sentence.strip()
    return Example(ex_id, spec.template.format(sentence=sentence), spec.label_words[label], label,
                   text=sentence)


def ag_news_example(ex_id: str, text: str, label: int) -> Example:
    spec = TASKS["ag_news"]
    return Example(ex_id, spec.template.format(text=text), spec.label_words[label], label, text=text)


def xquad_example(ex_id: str, context: str, question: str, answers: list[str]) -> Example:
    prompt = TASKS["xquad"].template.format(context=context.strip(), question=question.strip())
    return Example(ex_id, prompt, answers[0].strip(), None, tuple(a.strip() for a in answers),
                   text=context.strip())


def xsum_example(ex_id: str, document: str, summary: str) -> Example:
    doc = full = document.strip()
    if len(doc) > XSUM_MAX_DOC_CHARS:
        doc = doc[:XSUM_MAX_DOC_CHARS].rsplit(None, 1)[0]
    summary = summary.strip()
    return Example(ex_id, TASKS["xsum"].template.format(document=doc), summary, None, (summary,),
                   text=full)


# The original crawl turned "&" into a space: "doesn #39;t", "In  quot;helping", "J amp;J".
_ENTITY_RESIDUE = re.compile(r"(^| )(#\d+|quot|amp|lt|gt|hellip);")
# Real tags (<b>, <A HREF=...>, <br />) but not Reuters tickers such as <TXN.N>.
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")


def clean_ag_news(text: str) -> str:
    """Undo AG News residue: entities lost their '&' ("doesn #39;t" -> "doesn't", " quot;" ->
    '"', " #36;10" -> "$10"), escaped HTML tags ("&lt;b&gt;") are dropped, "\\$" is a dollar
    sign and any other backslash marked a line break ("second\\team" -> "second team"; "\\n" is
    no newline escape either: "social\\network")."""
    text = _ENTITY_RESIDUE.sub(r"&\2;", text)
    text = html.unescape(html.unescape(text))  # "&amp;lt;" needs two passes
    text = _HTML_TAG.sub(" ", text)
    text = text.replace("\\$", "$")
    text = re.sub(r"\\+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def ag_news_text(title: str, description: str) -> str:
    title, description = clean_ag_news(title), clean_ag_news(description)
    sep = " " if title[-1:] in ".?!" else ". "
    return title + sep + description
