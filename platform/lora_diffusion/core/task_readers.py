"""Readers of each task's local file formats (GLUE TSV, AG News CSV, SQuAD JSON, XSum JSONL)
and of its Hugging Face hub copy, mapped to the same Examples and ids. Splitting: tasks.py.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from .errors import UserError
from .task_specs import Example, ag_news_example, ag_news_text, clean_ag_news, sst2_example, xquad_example, xsum_example

# Where each task's files live under the data directory, and its hub copy (id, config).
FOLDERS = {"sst2": "sst2", "ag_news": "ag_news", "xquad": "xquad_en", "xsum": "xsum"}
LOCAL_FILES = {
    "sst2": ["train.tsv", "dev.tsv"],
    "ag_news": ["test.csv"],
    "xquad": ["xquad.en.json"],
    "xsum": ["lookback-lens/xsum-1000.jsonl", "llm_decoding/test.jsonl"],
}
# A task's rows with the key its split cut groups by: the file for SST-2 ("train": train.tsv,
# "dev": the GLUE dev file), the class for AG News, the article title for XQuAD, the id for XSum.
Rows = tuple[tuple[Example, object], ...]

HUB = {
    "sst2": ("nyu-mll/glue", "sst2"),
    "ag_news": ("fancyzhx/ag_news", None),
    "xquad": ("google/xquad", "xquad.en"),
    "xsum": ("EdinburghNLP/xsum", None),
}


@lru_cache(maxsize=16)  # parsing SST-2 train takes ~1 s; callers load the same split often
def read_local(task: str, paths: tuple[str, ...]) -> Rows:
    """All of a task's local rows (every split), each with its group (see Rows)."""
    if task == "sst2":
        return tuple((ex, Path(p).stem) for p in paths for ex in _read_sst2(Path(p), f"sst2/{Path(p).stem}"))
    if task == "ag_news":
        return tuple((ex, ex.label) for ex in _read_ag_news(Path(paths[0]), "ag_news/test.csv"))
    if task == "xquad":
        return tuple(zip(*_read_xquad(Path(paths[0]), "xquad", use_qid=True)))
    return tuple((ex, ex.id) for ex in _read_xsum([Path(p) for p in paths], "xsum", use_id=True))


def read_data_file(task: str, data_file: str) -> tuple[Example, ...]:
    path = Path(data_file).expanduser()
    if not path.is_file():
        raise UserError(f"data_file: file not found: {path}")
    try:
        return _read_data_file(task, path)
    except UnicodeDecodeError:
        raise UserError(f"data_file: {path} is not a text file (not UTF-8)") from None
    except csv.Error as exc:
        raise UserError(f"data_file: {path} is not valid CSV: {exc}") from None


def _read_data_file(task: str, path: Path) -> tuple[Example, ...]:
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
    # datasets logs its own ERROR line for a file it cannot read; the UserError below is the one
    # line a bad file gets, so its logger is quiet while reading (restored after)
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()  # "Generating train split" for a file read in a second
    try:
        ds = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE,
                                   keep_default_na=False, features=features, split="train")
    except Exception as e:  # e.g. a label that is not an integer
        raise UserError(f"data_file: could not read {path} (column 'label' must hold 0/1): {e}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    cols = ds.to_dict()  # one Arrow -> Python conversion; iterating Columns is 100x slower
    rows = zip(cols["sentence"], cols["label"])
    return tuple(sst2_example(f"{prefix}/{i}", s, _check_label(lab, 2, path, "label"))
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
            examples.append(ag_news_example(f"{prefix}/{i}", ag_news_text(row[1], row[2]), label))
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
                    examples.append(xquad_example(ex_id, para["context"], qa["question"], answers))
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
                examples.append(xsum_example(ex_id, row["document"], row["summary"]))
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
def read_hub(task: str) -> Rows:
    """The hub copy of the same data, mapped to the same ids and groups where the rows are the
    same rows (GLUE SST-2 and HF ag_news test keep the original file order)."""
    import datasets

    hub_id, config = HUB[task]
    if task == "sst2":
        return tuple((sst2_example(f"sst2/{name}/{i}", r["sentence"], r["label"]), name)
                     for name, hub_split in (("train", "train"), ("dev", "validation"))
                     for i, r in enumerate(datasets.load_dataset(hub_id, config, split=hub_split)))
    if task == "ag_news":  # hub text is "title description" already joined
        ds = datasets.load_dataset(hub_id, split="test")
        return tuple((ag_news_example(f"ag_news/test.csv/{i}", clean_ag_news(r["text"]),
                                       r["label"]), r["label"]) for i, r in enumerate(ds))
    if task == "xquad":  # no titles on the hub: group by context
        ds = datasets.load_dataset(hub_id, config, split="validation")
        return tuple((xquad_example(f"xquad/{r['id']}", r["context"], r["question"],
                                     r["answers"]["text"]), r["context"]) for r in ds)
    ds = datasets.load_dataset(hub_id, split="test")
    return tuple((xsum_example(f"xsum/{r['id']}", r["document"], r["summary"]), f"xsum/{r['id']}")
                 for r in ds)
