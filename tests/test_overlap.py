"""Evaluation sets are checked against the run's training rows: exact and containment overlap,
refused above 1% unless allowed, and the fraction reported beside the metric."""

import json

import pytest

from lora_diffusion.cli import main
from lora_diffusion.core import overlap, tasks
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.splits import word_spans
from lora_diffusion.core.task_specs import Example


def rows(*texts):
    return [Example(f"t/{i}", "p", "w", 0, text=t) for i, t in enumerate(texts)]


def test_exact_and_inside_a_training_row_overlap_as_whole_words():
    training = overlap.TrainingText(["It 's badder than  worse .", "badly acted"])
    assert training.overlaps("it 's BADDER than worse .")  # exact after lowercase and whitespace
    assert training.overlaps("than worse .")  # inside a training row
    assert not training.overlaps("bad")  # whole words only: not inside "badder" or "badly"
    assert not training.overlaps("badd")


def test_containing_a_training_row_counts_only_when_it_is_most_of_the_row():
    training = overlap.TrainingText(["is so bad", "at its best", "charming"])
    assert training.overlaps("this is so bad .")  # 3 of 5 words were a training row
    assert not training.overlaps("old-form moviemaking at its best .")  # 3 of 6: half, not most
    assert not training.overlaps("a charming film")  # a training word is language, not leakage


def test_overlap_above_one_percent_is_refused_naming_the_set_and_fraction():
    training = overlap.TrainingText([f"phrase number {i}" for i in range(50)])
    evaluation = rows(*[f"phrase number {i}" for i in range(2)], *[f"new row {i}" for i in range(98)])
    with pytest.raises(UserError, match=r"^test_file x\.tsv: 2\.0% of its 100 rows overlap"):
        overlap.check_overlap("test_file x.tsv", evaluation, training, allow=False)
    assert overlap.check_overlap("test_file x.tsv", evaluation, training, allow=True) == 0.02
    one_in_100 = evaluation[:1] + evaluation[2:] + rows("another new row")
    assert overlap.check_overlap("v", one_in_100, training, allow=False) == 0.01


# --- the run: every evaluation set checked, the fraction reported --------------------------------


def test_a_test_file_of_training_rows_is_refused_before_any_model_loads(tiny_config, tmp_path):
    from lora_diffusion.core.recipe import Recipe

    train = tasks.load_split("sst2", "train", tiny_config().data_dir)
    leaked = tmp_path / "leaked.tsv"
    leaked.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in train[:8]))
    with pytest.raises(UserError, match=r"test_file .*leaked\.tsv: 100\.0% of its 8 rows"):
        Recipe(tiny_config(test_file=str(leaked), max_train_examples=None, max_eval_examples=None,
                           backbone="/no/such/model"))


@pytest.fixture
def ag_news_checkpoint(tiny_backbone_dir, synthetic_data_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    sets = [f"backbone={tiny_backbone_dir}", f"data_dir={synthetic_data_dir}", "task=ag_news",
            "trajectory.injection_layers=[0]", "train.steps=1", "max_length=48",
            "train_accuracy_examples=8", "max_eval_examples=8"]
    assert main(["train", "--output-dir", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    return out


def test_eval_refuses_ag_news_own_test_csv_unless_allowed(ag_news_checkpoint, synthetic_data_dir,
                                                         tmp_path, capsys):
    """AG News' train split is cut from its test.csv: evaluating that file evaluates training rows.
    (Its first 200 rows, to keep the evaluation short: the same ids, "ag_news/test.csv/<row>".)"""
    data_file = tmp_path / "test.csv"
    lines = (synthetic_data_dir / "ag_news" / "test.csv").read_text().splitlines(keepends=True)
    data_file.write_text("".join(lines[:200]))
    args = ["eval", "--checkpoint", str(ag_news_checkpoint), "--data-file", str(data_file),
            "--set", "max_eval_examples=null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    train_ids = {e.id for e in tasks.load_split("ag_news", "train", str(synthetic_data_dir))}
    expected = len(train_ids & {f"ag_news/test.csv/{i}" for i in range(200)}) / 200
    assert expected > 0.5
    assert len(err) == 1 and str(data_file) in err[0] and f"{expected:.1%} of its 200 rows" in err[0]

    assert main(args + ["--allow-overlap"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test/overlap"] == pytest.approx(expected) and result["test/examples"] == 200
    assert "test/accuracy" in result and result["test/source"] == str(data_file)


# --- the real data --------------------------------------------------------------------------------


def test_sst2_validation_sentences_share_no_phrase_with_train(real_data_dir):
    """Not even a one-word phrase: every training phrase inside a validation sentence is gone
    (stricter than the overlap rule, which ignores short phrases inside a row)."""
    train = tasks.load_split("sst2", "train", str(real_data_dir))
    validation = tasks.load_split("sst2", "validation", str(real_data_dir))
    training = overlap.TrainingText(e.text for e in train)
    sentences = [overlap.normalise(e.text) for e in validation]
    assert not [s for s in sentences if any(span in training.rows for span in word_spans(s))]
    assert not [s for s in sentences if f" {s} " in training.joined]
    assert overlap.overlap_fraction(validation, training) == 0.0


def test_glue_dev_overlap_with_train_is_measured_and_under_the_limit(real_data_dir):
    """GLUE dev (the SST-2 test split): 2 sentences inside training phrases ("bad ." in "it 's
    badder than bad ."), 1 mostly a training phrase; reported, not refused."""
    train = tasks.load_split("sst2", "train", str(real_data_dir))
    test = tasks.load_split("sst2", "test", str(real_data_dir))
    fraction = overlap.overlap_fraction(test, overlap.TrainingText(e.text for e in train))
    assert fraction == pytest.approx(3 / 872) and fraction < overlap.MAX_OVERLAP


def test_ag_news_own_test_csv_is_mostly_training_rows(real_data_dir):
    """The train split is a cut of test.csv: 4,748 of its 7,600 rows are training rows."""
    train = tasks.load_split("ag_news", "train", str(real_data_dir))
    own = tasks.load_split("ag_news", "test", data_file=str(real_data_dir / "ag_news" / "test.csv"))
    fraction = overlap.overlap_fraction(own, overlap.TrainingText(e.text for e in train))
    assert fraction == pytest.approx(4748 / 7600)
