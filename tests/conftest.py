"""Shared fixtures: a tiny random BERT masked LM on disk, task data, a tiny config.

Task data comes two ways. `synthetic_data_dir` holds a few hundred made-up rows per task, written
in each task's own file format (the layout of ../shared/data), so every test runs without the real
files. `real_data_dir` is the real data folder, for the few tests that check facts of the real
files (row counts, real overlaps); where it is absent they skip, saying so, and where
$LORA_DIFFUSION_REQUIRE_DATA=1 (CI, which has the data) they fail instead: nothing may skip there
for missing data.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRE_DATA_ENV = "LORA_DIFFUSION_REQUIRE_DATA"
# Every file the task loaders read, relative to the data folder.
REAL_FILES = ("sst2/train.tsv", "sst2/dev.tsv", "ag_news/test.csv", "xquad_en/xquad.en.json",
              "xsum/lookback-lens/xsum-1000.jsonl", "xsum/llm_decoding/test.jsonl")

# `datasets` draws "Generating train split" bars on stderr the first time it reads a file into
# its cache: with synthetic files in fresh temp dirs that is every session, and the bars would
# be extra lines in the stderr test_cli.py holds to exactly one line (the error). Turning them off
# keeps that check strict. Set before anything imports `datasets` (it reads this on import).
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


def data_dir() -> Path:
    return Path(os.environ.get("LORA_DIFFUSION_DATA_DIR", REPO.parent / "shared" / "data"))


def skip_for_missing_data(reason: str):
    """Skip a test that needs the real data; fail it, with the same message, where the data must
    be there ($LORA_DIFFUSION_REQUIRE_DATA=1)."""
    if os.environ.get(REQUIRE_DATA_ENV) == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def missing_real_data():
    """`skip_for_missing_data`, for tests that find the real data some other way."""
    return skip_for_missing_data


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = data_dir()
    missing = [f for f in REAL_FILES if not (d / f).is_file()]
    if missing:
        skip_for_missing_data(f"this test checks the real data files; {d / missing[0]} not found: "
                              "set LORA_DIFFUSION_DATA_DIR to the data folder (../shared/data)")
    return d


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """Made-up rows for all four tasks, in the real files' formats and folder layout."""
    root = tmp_path_factory.mktemp("synthetic-data")
    write_sst2(root / "sst2")
    write_ag_news(root / "ag_news")
    write_xquad(root / "xquad_en")
    write_xsum(root / "xsum")
    return root


@pytest.fixture(params=["synthetic", "real"])
def task_data_dir(request) -> Path:
    """The synthetic rows, then the real files: for checks of the loaders that hold on both."""
    return request.getfixturevalue(f"{request.param}_data_dir")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BertForMaskedLM with the MiniLM (bert-base-uncased) tokenizer."""
    from lora_diffusion.core.backbone import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_config(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    """A config that trains in about a second on the tiny backbone and synthetic SST-2 rows."""
    from lora_diffusion.core import config as config_lib

    def make(**sets):
        base = {
            "backbone": str(tiny_backbone_dir), "data_dir": str(synthetic_data_dir),
            "max_length": 32, "max_train_examples": 64, "max_eval_examples": 16,
            "train_accuracy_examples": 16, "output_dir": str(tmp_path / "out"),
            "train.steps": 4, "train.batch_size": 8, "train.eval_every": 2, "train.warmup_steps": 1,
            "trajectory.injection_layers": [0],
        }
        base.update(sets)
        return config_lib.from_dict({}, base)

    return make


# ----------------------------------------------------------------------------------------------
# Synthetic rows. Sizes: SST-2 train (293 rows once validation's sentences and every phrase inside
# them leave it) holds 32 batches of 8 with phrase lengths as skewed as the real ones
# (group_by_length's padding test); AG News, XQuAD and XSum have enough rows, articles and ids
# for each of their three cuts (splits.py) to be non-empty.

WORDS = ("the film story actors plot scene music director camera ending script characters "
         "moments pace dialogue cast minutes audience screen drama").split()
SENTIMENT = {0: "terrible dull boring awful tedious bland".split(),
             1: "great moving charming funny brilliant lovely".split()}
TOPICS = {1: "government minister election troops treaty border".split(),  # AG News classes 1-4
          2: "team coach season match league players".split(),
          3: "shares profit market company investors prices".split(),
          4: "software researchers computer internet chip space".split()}


def _phrase(rng: random.Random, label: int, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    words[rng.randrange(n_words)] = rng.choice(SENTIMENT[label])
    return " ".join(words)


def write_sst2(folder: Path, n_train: int = 400, n_dev: int = 48) -> None:
    """GLUE TSV: header, then `phrase <TAB>label` (the real rows keep a space before the tab).
    Train phrases are mostly short, as SST-2's are, and a few rows repeat, as SST-2's do."""
    rng = random.Random(0)
    train = []
    for i in range(n_train):
        label = rng.randrange(2)
        train.append(train[i // 2] if i % 40 == 39 else
                     (_phrase(rng, label, min(28, 1 + int(rng.expovariate(1 / 6)))), label))
    dev = [(_phrase(rng, i % 2, rng.randint(8, 24)), i % 2) for i in range(n_dev)]
    folder.mkdir(parents=True)
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        lines = ["sentence\tlabel"] + [f"{text} \t{label}" for text, label in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_ag_news(folder: Path, per_class: int = 500) -> None:
    """test.csv: no header, every field quoted: class index 1-4, title, description, with the
    real file's entity residue ("doesn #39;t") and backslash line breaks now and then."""
    rng = random.Random(1)
    folder.mkdir(parents=True)
    (folder / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n", encoding="utf-8")
    with open(folder / "test.csv", "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for i in range(4 * per_class):
            label = 1 + i % 4
            title = " ".join(rng.choice(TOPICS[label]) for _ in range(4)).capitalize()
            body = " ".join(rng.choice(TOPICS[label] + WORDS) for _ in range(rng.randint(8, 30)))
            if i % 7 == 0:
                body = "it doesn #39;t stop:\\" + body
            out.writerow([str(label), title, body + "."])


def write_xquad(folder: Path, n_articles: int = 10) -> None:
    """SQuAD v1.1 JSON: articles with titles, paragraphs, questions with extractive answers."""
    rng = random.Random(2)
    articles = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(2):
            facts = [(f"{rng.choice(WORDS)} {a}-{p}-{q}", str(rng.randint(1800, 2020))) for q in range(3)]
            context = " ".join(f"The {thing} was first shown in {year}." for thing, year in facts)
            qas = [{"answers": [{"answer_start": context.index(f"in {year}") + 3, "text": year}],
                    "id": f"{a:04d}{p:02d}{q:02d}", "question": f"When was the {thing} first shown?"}
                   for q, (thing, year) in enumerate(facts)]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"paragraphs": paragraphs, "title": f"Article_{a}"})
    folder.mkdir(parents=True)
    text = json.dumps({"data": articles, "version": "1.1"}, indent=4)
    (folder / "xquad.en.json").write_text(text, encoding="utf-8")


def write_xsum(folder: Path, per_file: int = 30, shared: int = 6) -> None:
    """Two JSONL files of document, summary, id; `shared` ids are in both (same rows), stored as
    str in one file and int in the other; every fifth document is longer than the 1,500-character
    cap."""
    rng = random.Random(3)
    rows = []
    for i in range(2 * per_file - shared):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                     for _ in range(30 if i % 5 == 0 else 4)]
        rows.append({"document": "\n".join(sentences), "summary": sentences[0], "id": 30000000 + i})
    first, second = rows[:per_file], rows[per_file - shared:]
    for name, part, as_str in (("lookback-lens/xsum-1000.jsonl", first, True),
                               ("llm_decoding/test.jsonl", second, False)):
        path = folder / name
        path.parent.mkdir(parents=True)
        lines = [json.dumps({**r, "id": str(r["id"]) if as_str else r["id"]}) for r in part]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
