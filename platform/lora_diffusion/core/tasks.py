"""Task data: prompts, targets, label words, fixed train/dev splits and metrics.

Four tasks, each read from local copies under a data directory (see /work/shared/data/README.md)
or, only when asked, from the Hugging Face hub:

    sst2     classification  GLUE SST-2 train.tsv / dev.tsv
    ag_news  classification  AG News test.csv, cut into train/dev here (no local train.csv)
    xquad    generation      XQuAD-en (a SQuAD v1.1 dev subset), cut into train/dev by article
    xsum     generation      two 1,000-row XSum test subsets, deduplicated, cut into train/dev by id

Every split is a pure function of the data: it uses a fixed seed (SPLIT_SEED), never the run seed,
so train/dev never move between runs and train accuracy can't leak into dev numbers. Example ids
are "<task>/..." strings, unique across a task's splits, so leakage is checkable by set
intersection.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lora_diffusion.core.errors import UserError

DATA_DIR_ENV = "LORA_DIFFUSION_DATA_DIR"
SPLIT_SEED = 0  # fixed: the train/dev cuts below must not depend on the run seed
AG_NEWS_DEV_PER_CLASS = 475  # 4 x 475 = 1,900 dev rows, the rest train
XQUAD_DEV_FRACTION = 0.2  # of articles (titles), so contexts never leak between splits
XSUM_DEV_FRACTION = 0.2  # of unique ids
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


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" or "generation"
    template: str
    label_words: tuple[str, ...]  # one per class index; single bert-base-uncased WordPieces
    splits: tuple[str, ...]
    split_note: str


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        kind="classification",
        template="Review: {sentence}\nSentiment:",
        label_words=("terrible", "great"),  # 0 = negative, 1 = positive (LM-BFF's choice)
        splits=("train", "dev"),
        split_note="GLUE SST-2 train (67,349 phrases) and dev = GLUE validation (872 sentences); "
        "no labelled test set locally: evaluate a test file with data_file",
    ),
    "ag_news": TaskSpec(
        name="ag_news",
        kind="classification",
        template="Article: {text}\nTopic:",  # text = title + description
        label_words=("world", "sports", "business", "science"),  # World, Sports, Business, Sci/Tech
        splits=("train", "dev"),
        split_note="train/dev cut (fixed seed 0, stratified: 475 dev rows per class) from the "
        "AG News test.csv (7,600 rows): dev 1,900, train 5,700; not comparable to published "
        "AG News test numbers",
    ),
    "xquad": TaskSpec(
        name="xquad",
        kind="generation",
        template="Context: {context}\nQuestion: {question}\nAnswer:",
        label_words=(),
        splits=("train", "dev"),
        split_note="train/dev cut (fixed seed 0) from XQuAD-en, itself a SQuAD v1.1 dev subset: "
        "20% of the 48 articles go to dev, grouped by article title so no context is in both; "
        "the hub copy has no titles and is grouped by context instead; not comparable to "
        "published SQuAD/XQuAD numbers",
    ),
    "xsum": TaskSpec(
        name="xsum",
        kind="generation",
        template="Document: {document}\nSummary:",  # document capped at XSUM_MAX_DOC_CHARS
        label_words=(),
        splits=("train", "dev"),
        split_note="train/dev cut (fixed seed 0, 20% of unique ids to dev) from 1,910 unique "
        "XSum test-split articles (two 1,000-row subsets deduplicated on id); documents cut to "
        f"{XSUM_MAX_DOC_CHARS} characters; not comparable to published XSum test numbers",
    ),
}

# Where each task's files live under the data directory, and its hub copy (id, config).
_FOLDERS = {"sst2": "sst2", "ag_news": "ag_news", "xquad": "xquad_en", "xsum": "xsum"}
_LOCAL_FILES = {
    "sst2": {"train": ["train.tsv"], "dev": ["dev.tsv"]},
    "ag_news": {"*": ["test.csv"]},
    "xquad": {"*": ["xquad.en.json"]},
    "xsum": {"*": ["lookback-lens/xsum-1000.jsonl", "llm_decoding/test.jsonl"]},
}
# A task's rows with the key its train/dev cut groups by (class, article title, id; None for SST-2).
Rows = tuple[tuple[Example, object], ...]

_HUB = {
    "sst2": ("nyu-mll/glue", "sst2"),
    "ag_news": ("fancyzhx/ag_news", None),
    "xquad": ("google/xquad", "xquad.en"),
    "xsum": ("EdinburghNLP/xsum", None),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"task: unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


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
        examples = list(_load_data_file(task, data_file))
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
    names = _LOCAL_FILES[task].get(split, _LOCAL_FILES[task].get("*"))
    paths = [root / _FOLDERS[task] / n for n in names] if root is not None else []
    missing = [p for p in paths if not p.is_file()]
    if paths and not missing:
        rows = _read_local(task, split, tuple(str(p) for p in paths))
    elif not allow_hub:
        raise UserError(f"data_dir: {_where(task, missing)}; set {DATA_DIR_ENV} or data_dir "
                        f"to the folder holding {_FOLDERS[task]}/, or allow_hub")
    else:
        try:
            rows = _read_hub(task, split)
        except Exception as e:  # no network, no hub cache, renamed dataset: all user-fixable
            raise UserError(f"data_dir: {_where(task, missing)}, and the hub dataset "
                            f"{_HUB[task][0]} could not be loaded ({type(e).__name__}: {e})") from e
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
    paths = [root / _FOLDERS[task] / n for names in _LOCAL_FILES[task].values() for n in names] \
        if root is not None else []
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise UserError(f"data_dir: {_where(task, missing)}; set {DATA_DIR_ENV} or data_dir "
                        f"to the folder holding {_FOLDERS[task]}/, or allow_hub")


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
# Row -> Example, one function per task (shared by local files, data_file and the hub)


def _sst2_example(ex_id: str, sentence: str, label: int) -> Example:
    spec = TASKS["sst2"]
    return Example(ex_id, spec.template.format(sentence=sentence.strip()),
                   spec.label_words[label], label)


def _ag_news_example(ex_id: str, text: str, label: int) -> Example:
    spec = TASKS["ag_news"]
    return Example(ex_id, spec.template.format(text=text), spec.label_words[label], label)


def _xquad_example(ex_id: str, context: str, question: str, answers: list[str]) -> Example:
    prompt = TASKS["xquad"].template.format(context=context.strip(), question=question.strip())
    return Example(ex_id, prompt, answers[0].strip(), None, tuple(a.strip() for a in answers))


def _xsum_example(ex_id: str, document: str, summary: str) -> Example:
    doc = document.strip()
    if len(doc) > XSUM_MAX_DOC_CHARS:
        doc = doc[:XSUM_MAX_DOC_CHARS].rsplit(None, 1)[0]
    summary = summary.strip()
    return Example(ex_id, TASKS["xsum"].template.format(document=doc), summary, None, (summary,))


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


def _ag_news_text(title: str, description: str) -> str:
    title, description = clean_ag_news(title), clean_ag_news(description)
    sep = " " if title[-1:] in ".?!" else ". "
    return title + sep + description


# ----------------------------------------------------------------------------------------------
# Readers


@lru_cache(maxsize=16)  # parsing SST-2 train takes ~1 s; callers load the same split often
def _read_local(task: str, split: str, paths: tuple[str, ...]) -> Rows:
    if task == "sst2":
        return tuple((ex, None) for ex in _read_sst2(Path(paths[0]), f"sst2/{split}"))
    if task == "ag_news":
        return tuple((ex, ex.label) for ex in _read_ag_news(Path(paths[0]), "ag_news/test.csv"))
    if task == "xquad":
        return tuple(zip(*_read_xquad(Path(paths[0]), "xquad", use_qid=True)))
    return tuple((ex, ex.id) for ex in _read_xsum([Path(p) for p in paths], "xsum", use_id=True))


def _load_data_file(task: str, data_file: str) -> tuple[Example, ...]:
    path = Path(data_file).expanduser()
    if not path.is_file():
        raise UserError(f"data_file: file not found: {path}")
    prefix = f"{task}/{path.name}"
    if task == "sst2":
        return _read_sst2(path, prefix)
    if task == "ag_news":
        return _read_ag_news(path, prefix)
    if task == "xquad":
        return _read_xquad(path, prefix, use_qid=False)[0]
    return _read_xsum([path], prefix, use_id=False)


def _read_sst2(path: Path, prefix: str) -> tuple[Example, ...]:
    """GLUE TSV with a header. quoting=3 (QUOTE_NONE): the text has bare '"' characters that
    a quoting reader would pair up across rows; na filtering off so no phrase becomes null."""
    import datasets  # lazily: importing it costs ~1 s and most callers never read a TSV

    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    for column in ("sentence", "label"):
        if column not in header:
            raise UserError(f"data_file: {path} has no column {column!r} (header: {header})")
    features = datasets.Features({c: datasets.Value("int64" if c == "label" else "string")
                                  for c in header})
    try:
        ds = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE,
                                   keep_default_na=False, features=features, split="train")
    except Exception as e:  # e.g. a label that is not an integer
        raise UserError(f"data_file: could not read {path} (column 'label' must hold 0/1): {e}") from e
    cols = ds.to_dict()  # one Arrow -> Python conversion; iterating Columns is 100x slower
    rows = zip(cols["sentence"], cols["label"])
    return tuple(_sst2_example(f"{prefix}/{i}", s, _check_label(lab, 2, path, "label"))
                 for i, (s, lab) in enumerate(rows))


def _read_ag_news(path: Path, prefix: str) -> tuple[Example, ...]:
    """No header: class index 1-4, title, description (internal quotes doubled)."""
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) < 3:
                missing = ("class index", "title", "description")[len(row)]
                raise UserError(f"data_file: {path} row {i} has no column {missing!r} "
                                "(expected class index 1-4, title, description; no header)")
            label = _check_label(row[0], 4, path, "class index", offset=1)
            examples.append(_ag_news_example(f"{prefix}/{i}", _ag_news_text(row[1], row[2]), label))
    return tuple(examples)


def _read_xquad(path: Path, prefix: str, use_qid: bool) -> tuple[tuple[Example, ...], list[str]]:
    """SQuAD v1.1 JSON; returns examples and each one's article title (the split group)."""
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        examples, titles = [], []
        for article in articles:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    ex_id = f"xquad/{qa['id']}" if use_qid else f"{prefix}/{len(examples)}"
                    answers = [a["text"] for a in qa["answers"]]
                    if not answers:
                        raise UserError(f"data_file: {path} question {qa['id']} has no answers")
                    examples.append(_xquad_example(ex_id, para["context"], qa["question"], answers))
                    titles.append(article["title"])
    except KeyError as e:
        raise UserError(f"data_file: {path} has no field {e.args[0]!r} (SQuAD v1.1 format)") from e
    except json.JSONDecodeError as e:
        raise UserError(f"data_file: {path} is not JSON: {e}") from e
    return tuple(examples), titles


def _read_xsum(paths: list[Path], prefix: str, use_id: bool) -> tuple[Example, ...]:
    """JSONL with document, summary, id. The two local files share 90 ids (same content) and
    store id as str in one, int in the other: normalise to str and keep the first copy."""
    examples, seen = [], set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                for column in ("document", "summary", "id"):
                    if column not in row:
                        raise UserError(f"data_file: {path} line {i + 1} has no column {column!r}")
                key = str(row["id"]).strip()
                if key in seen:
                    continue
                seen.add(key)
                ex_id = f"xsum/{key}" if use_id else f"{prefix}/{i}"
                examples.append(_xsum_example(ex_id, row["document"], row["summary"]))
    return tuple(examples)


def _check_label(value, n_classes: int, path: Path, column: str, offset: int = 0) -> int:
    """Labels as class indices 0..n-1 (AG News files count from 1: offset=1)."""
    try:
        label = int(value) - offset
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label < n_classes:
        raise UserError(f"data_file: {path} column {column!r} has {value!r}; expected "
                        f"{offset}..{n_classes - 1 + offset}")
    return label


@lru_cache(maxsize=8)
def _read_hub(task: str, split: str) -> Rows:
    """The hub copy of the same data, mapped to the same ids where the rows are the same rows
    (GLUE SST-2 and HF ag_news test keep the original file order)."""
    import datasets

    hub_id, config = _HUB[task]
    if task == "sst2":
        ds = datasets.load_dataset(hub_id, config, split={"train": "train", "dev": "validation"}[split])
        return tuple((_sst2_example(f"sst2/{split}/{i}", r["sentence"], r["label"]), None)
                     for i, r in enumerate(ds))
    if task == "ag_news":  # hub text is "title description" already joined
        ds = datasets.load_dataset(hub_id, split="test")
        return tuple((_ag_news_example(f"ag_news/test.csv/{i}", clean_ag_news(r["text"]),
                                       r["label"]), r["label"]) for i, r in enumerate(ds))
    if task == "xquad":  # no titles on the hub: group by context
        ds = datasets.load_dataset(hub_id, config, split="validation")
        return tuple((_xquad_example(f"xquad/{r['id']}", r["context"], r["question"],
                                     r["answers"]["text"]), r["context"]) for r in ds)
    ds = datasets.load_dataset(hub_id, split="test")
    return tuple((_xsum_example(f"xsum/{r['id']}", r["document"], r["summary"]), f"xsum/{r['id']}")
                 for r in ds)


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
