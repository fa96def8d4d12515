"""prepare-backbone: diffusion-objective training on raw train-split text, resumable, cached by
fingerprint, evaluated on held-out (validation) text."""

import dataclasses
import json

import pytest
import torch

from lora_diffusion.core import prepare
from lora_diffusion.core.backbone import load_backbone
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.prepare import PrepareSettings, prepare_backbone


@pytest.fixture
def settings(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    """Seconds on the tiny backbone: 6 steps of 4 windows of 32 tokens, a checkpoint every 2."""
    return PrepareSettings(backbone=str(tiny_backbone_dir), data_dir=str(synthetic_data_dir),
                           cache_dir=str(tmp_path / "cache"), steps=6, batch_size=4, max_length=32,
                           lr=1e-2, checkpoint_every=2, eval_texts=8)


def _weights(directory) -> dict:
    return load_backbone(str(directory)).model.state_dict()


def test_full_preparation_saves_a_loadable_model_with_figures_before_and_after(settings):
    result = prepare_backbone(settings, log=None)
    saved = json.loads((prepare.Path(result["out"]) / "prepare_result.json").read_text())
    assert saved["heldout_note"].startswith("validation splits")
    for when in ("before", "after"):
        figures = saved[when]["heldout"]
        for t in ("0.15", "0.5", "0.85"):
            assert 0 <= figures[t]["accuracy"] <= 1 and figures[t]["bound"] > 1
        assert figures["integrated"]["bound"] > 1
        assert {s["corpus"] for s in saved[when]["samples"]} == set(settings.corpora)
    assert saved["after"]["heldout"]["0.15"]["bound"] < saved["before"]["heldout"]["0.15"]["bound"]
    before = load_backbone(settings.backbone).model.state_dict()
    after = _weights(result["out"])
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])
    assert not prepare.Path(result["out"] + ".work").exists()  # the working area is cleaned up


def test_head_mode_trains_only_the_head(settings):
    torch.manual_seed(settings.seed)  # the head of a headless encoder is seeded; the tiny one has one
    before = load_backbone(settings.backbone).model.state_dict()
    result = prepare_backbone(dataclasses.replace(settings, mode="head", steps=3), log=None)
    after = _weights(result["out"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("cls.") for k in changed)


def test_an_interrupted_run_continues_to_the_weights_of_an_uninterrupted_one(settings, monkeypatch, tmp_path):
    whole = prepare_backbone(dataclasses.replace(settings, cache_dir=str(tmp_path / "a")), log=None)
    real_step, calls = prepare._train_step, []

    def crash_at_fourth_step(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args)

    interrupted = dataclasses.replace(settings, cache_dir=str(tmp_path / "b"))
    monkeypatch.setattr(prepare, "_train_step", crash_at_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        prepare_backbone(interrupted, log=None)
    monkeypatch.setattr(prepare, "_train_step", real_step)
    work = next((tmp_path / "b" / "prepared").glob("*.work"))
    assert torch.load(work / "state.pt", weights_only=False)["step"] == 2  # lost step 3 only
    assert not list((tmp_path / "b" / "prepared").glob("*-????????????????"))  # nothing usable yet
    lines = []
    resumed = prepare_backbone(interrupted, log=lines.append)
    assert any("resuming from step 2" in line for line in lines)
    a, b = _weights(whole["out"]), _weights(resumed["out"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_after_leaves_a_partial_run_that_the_same_call_completes(settings):
    partial = prepare_backbone(settings, log=None, stop_after=3)
    assert partial["status"] == "partial" and partial["step"] == 3
    checkpoint = prepare_backbone(settings, log=None, eval_only=True)
    assert checkpoint["status"] == "checkpoint" and checkpoint["step"] == 3
    assert (prepare.Path(partial["work"]) / "eval_step3.json").is_file()
    assert prepare_backbone(settings, log=None)["status"] == "done"


def test_a_second_identical_call_is_a_cache_hit_without_training(settings, monkeypatch, tmp_path):
    first = prepare_backbone(settings, log=None)
    monkeypatch.setattr(prepare, "train", lambda *a, **k: pytest.fail("trained on a cache hit"))
    again = prepare_backbone(dataclasses.replace(settings, out=str(tmp_path / "link")), log=None)
    assert again["cached"] and again["out"] == first["out"]
    assert (tmp_path / "link").resolve() == prepare.Path(first["out"]).resolve()


def test_the_fingerprint_keys_what_changes_the_weights_only():
    base = PrepareSettings()
    fp = prepare.run_fingerprint(base, "src")
    for change in (dict(steps=7), dict(lr=1e-3), dict(batch_size=3), dict(max_length=48),
                   dict(seed=1), dict(mode="head"), dict(corpora=("sst2",))):
        assert prepare.run_fingerprint(dataclasses.replace(base, **change), "src") != fp, change
    assert prepare.run_fingerprint(base, "other source") != fp
    same = dataclasses.replace(base, threads=1, checkpoint_every=7, out="x", cache_dir="y")
    assert prepare.run_fingerprint(same, "src") == fp


@pytest.mark.parametrize("flag, value, field", [("--steps", "0", "steps"),
                                                ("--batch-size", "0", "batch_size"),
                                                ("--lr", "-1", "lr")])
def test_bad_settings_are_one_error_line_and_write_nothing(tiny_backbone_dir, synthetic_data_dir,
                                                           tmp_path, capsys, flag, value, field):
    from lora_diffusion.cli import main

    code = main(["prepare-backbone", "--backbone", str(tiny_backbone_dir), "--data-dir",
                 str(synthetic_data_dir), "--cache-dir", str(tmp_path / "cache"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"field {field}:" in err[0]
    assert not (tmp_path / "cache").exists()


def test_out_refuses_to_replace_a_real_directory(settings, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="out:"):
        prepare_backbone(dataclasses.replace(settings, out=str(tmp_path / "taken")), log=None)


def test_heldout_text_is_validation_text_never_trained_on(synthetic_data_dir, monkeypatch):
    from lora_diffusion.core import prepare_corpus, tasks

    corpora = prepare_corpus.CORPORA
    train, heldout = prepare_corpus.training_and_heldout_texts(corpora, str(synthetic_data_dir), 50, 0)
    for c in corpora:
        assert heldout[c] and train[c] and not set(heldout[c]) & set(train[c])
        validation = {e.text for e in tasks.load_split(c, "validation", str(synthetic_data_dir))}
        assert set(heldout[c]) <= validation
    real = prepare_corpus.corpus_texts
    monkeypatch.setattr(prepare_corpus, "corpus_texts",  # validation = the first train texts
                        lambda c, split, data_dir, *a, **k: real(c, "train", data_dir)[:5])
    _, leaked = prepare_corpus.training_and_heldout_texts(("ag_news",), str(synthetic_data_dir), 5, 0)
    assert leaked["ag_news"] == []  # a held-out text also in train is dropped, never scored


def test_training_text_is_raw_text_not_templates_and_sst2_phrases_read_once(synthetic_data_dir):
    from lora_diffusion.core import prepare_corpus, tasks

    texts = prepare_corpus.corpus_texts("sst2", "train", str(synthetic_data_dir))
    assert not any("Sentiment:" in t or "Review:" in t for t in texts)
    assert not any(a != b and f" {a} " in f" {b} " for a in texts for b in texts)  # no sub-phrases
    assert len(texts) < len(tasks.load_split("sst2", "train", str(synthetic_data_dir)))


def test_windows_are_packed_to_length_and_separators_are_never_masked(tiny_backbone_dir):
    from transformers import AutoTokenizer

    from lora_diffusion.core.prepare_corpus import pack_windows, window_batch

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    windows = pack_windows(tok, ["word " * 50, "short text", "more words here"], max_length=32)
    assert [len(w) for w in windows[:-1]] == [30] * (len(windows) - 1)
    batch = window_batch(tok, windows)
    assert batch.input_ids.shape[1] == 32
    assert not (batch.response_mask & (batch.input_ids == tok.sep_token_id)).any()
    assert not batch.response_mask[:, 0].any()
