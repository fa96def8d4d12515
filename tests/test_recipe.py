"""The shared recipe: no leakage, reproducible checkpoints, accounting that matches the file."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_diffusion.core import checkpoint, checkpoint_files, diffusion, evaluation
from lora_diffusion.core.accounting import account
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.recipe import Recipe


def test_training_never_sees_validation_or_test_rows(tiny_config):
    recipe = Recipe(tiny_config(**{"train.steps": 20}))
    seen = {e.id for step in range(20) for e in recipe.train_batch(step)}
    held_out = {e.id for e in recipe.validation_examples + recipe.test_examples}
    assert seen and recipe.validation_examples and recipe.test_examples
    assert seen <= {e.id for e in recipe.train_examples}
    assert not seen & held_out
    assert all(i.startswith("sst2/train/") for i in seen)


def test_batches_depend_only_on_seed_and_step(tiny_config):
    a, b = Recipe(tiny_config()), Recipe(tiny_config())
    assert [e.id for e in a.train_batch(7)] == [e.id for e in b.train_batch(7)]
    c = Recipe(tiny_config(**{"train.seed": 1}))
    assert [e.id for e in a.train_batch(7)] != [e.id for e in c.train_batch(7)]


def test_evaluation_subsets_are_the_same_rows_for_every_seed(tiny_config, synthetic_data_dir):
    """max_eval_examples picks its rows with the fixed split seed: seeds differ in the model only."""
    sets = {"max_eval_examples": 12, "test_file": str(synthetic_data_dir / "sst2" / "dev.tsv")}
    a, b = Recipe(tiny_config(**sets)), Recipe(tiny_config(**sets, **{"train.seed": 1}))
    assert len(a.validation_examples) == 12 and len(a.test_examples) == 12
    assert [e.id for e in a.validation_examples] == [e.id for e in b.validation_examples]
    assert [e.id for e in a.test_examples] == [e.id for e in b.test_examples]


def test_group_by_length_keeps_the_epoch_and_cuts_padding(tiny_config):
    """Grouped batches: the same examples once per epoch, far less padding than random batches,
    and still a function of (seed, step) only."""
    sets = {"max_train_examples": 256, "train.batch_size": 8}  # a whole number of batches
    plain, grouped = Recipe(tiny_config(**sets)), Recipe(tiny_config(**sets, **{"train.group_by_length": True}))
    steps = len(plain.train_examples) // 8

    def epoch(recipe):
        batches = [recipe.train_batch(s) for s in range(steps)]
        masks = [recipe.encode(b).attention_mask for b in batches]
        fill = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        return sorted(e.id for b in batches for e in b), fill

    (ids_plain, fill_plain), (ids_grouped, fill_grouped) = epoch(plain), epoch(grouped)
    assert ids_grouped == ids_plain == sorted(e.id for e in plain.train_examples)
    assert fill_grouped > 0.9 > fill_plain + 0.2
    again = Recipe(tiny_config(**sets, **{"train.group_by_length": True}))
    assert [e.id for e in again.train_batch(5)] == [e.id for e in grouped.train_batch(5)]


def test_workers_split_the_global_batch(tiny_config):
    full = Recipe(tiny_config()).train_batch(3)
    w0 = Recipe(tiny_config(), rank=0, world_size=2).train_batch(3)
    w1 = Recipe(tiny_config(), rank=1, world_size=2).train_batch(3)
    assert sorted(e.id for e in w0 + w1) == sorted(e.id for e in full)


def test_save_load_evaluate_reproduces_accuracy_and_counts_match_file(tiny_config, tmp_path):
    config = tiny_config()
    recipe = Recipe(config)
    result = recipe.run(log=None)
    out = checkpoint.save(tmp_path / "ckpt", recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    tensors = load_file(out / checkpoint_files.WEIGHTS)
    acc = account(recipe.method)
    assert acc["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert acc["bytes_saved"] == (out / checkpoint_files.WEIGHTS).stat().st_size
    assert result["accounting"]["trainable_params"] == acc["trainable_params"]

    restored = Recipe.from_checkpoint(out)
    again = restored.evaluate(restored.test_examples, "test")
    assert again["test/accuracy"] == result["test/accuracy"]
    assert again["test/accuracy_sampler"] == result["test/accuracy_sampler"]
    assert json.loads((out / "config.json").read_text())["trajectory"]["rank"] == config.trajectory.rank


def test_result_labels_every_accuracy_by_split(tiny_config, tmp_path, synthetic_data_dir):
    """Selection sees validation, reports see test; each evaluation set's overlap with the run's
    training rows beside its metric; test is the task's test split or test_file."""
    rows = (Path(synthetic_data_dir) / "sst2" / "dev.tsv").read_text().splitlines()[:9]
    test_file = tmp_path / "external.tsv"
    test_file.write_text("\n".join(rows) + "\n")
    result = Recipe(tiny_config(test_file=str(test_file))).run(log=None)
    for key in ("train/accuracy", "validation/accuracy", "validation/accuracy_sampler",
                "test/accuracy", "test/accuracy_sampler"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["validation/overlap"] == 0.0 and result["test/overlap"] == 0.0
    assert not any(k.startswith("dev/") for k in result)
    assert result["test/examples"] == 8 and result["test/source"] == str(test_file)
    assert result["tokens_per_s"] > 0 and result["peak_memory_mb"] > 0


def test_a_search_trial_scores_validation_only_and_a_result_run_scores_test(tiny_config):
    """evaluation.role: a search trial's final result has validation and no test, train subset
    or diagnostics (none set); a result run (the default: train, grids, retrains) has them all."""
    sets = {"trajectory.num_phases": 2}
    search = Recipe(tiny_config(**sets, **{"evaluation.role": "search"})).run(log=None)
    assert 0.0 <= search["validation/accuracy"] <= 1.0 and "validation/accuracy_sampler" in search
    assert not [k for k in search if k.startswith(("test/", "train/accuracy")) or "per_t" in k or "phase_gain" in k]
    result = Recipe(tiny_config(**sets)).run(log=None)
    assert {"test/accuracy", "train/accuracy", "test/phase_gain/0", "validation/per_t/bound_bin0"} <= set(result)
    # diagnostics asked for explicitly are a search trial's too (phase gains on validation)
    asked = Recipe(tiny_config(**sets, **{"evaluation.role": "search", "diagnostics.per_t_bins": 2,
                                          "diagnostics.phase_gains": True})).run(log=None)
    assert {"validation/per_t/bound_bin1", "validation/phase_gain/1"} <= set(asked)
    assert not [k for k in asked if k.startswith("test/")]


# prefix through its MLP saves the prefix, not the MLP: resume must carry the MLP itself
@pytest.mark.parametrize("sets", [{}, {"method": "prefix", "prefix.projection": 8}], ids=["trajectory", "prefix_mlp"])
def test_resume_from_state_continues_identically(tiny_config, tmp_path, sets):
    from lora_diffusion.core.checkpoint import load_state, save_state

    config = tiny_config(**{"train.steps": 6, "train.eval_every": 3, **sets})
    straight = Recipe(config)
    straight.run(log=None)

    first = Recipe(config)
    for _ in range(3):
        first.train_step()
    save_state(tmp_path / "ckpt", first)  # through the files a Ray Train checkpoint holds
    resumed = Recipe(config)
    load_state(tmp_path / "ckpt", resumed)
    resumed.run(log=None)
    for name, tensor in straight.method.state_to_save().items():
        assert torch.equal(tensor, resumed.method.state_to_save()[name]), name


def test_saved_prefix_evaluates_but_does_not_train_without_its_mlp(tiny_config, tmp_path):
    config = tiny_config(**{"method": "prefix", "prefix.projection": 8})
    recipe = Recipe(config)
    recipe.train_step()
    checkpoint.save(tmp_path, recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    loaded = Recipe.from_checkpoint(tmp_path)
    assert loaded.evaluate(loaded.test_examples, "test") == recipe.evaluate(recipe.test_examples, "test")
    with pytest.raises(UserError, match="method_train.safetensors"):
        loaded.train_step()


def test_checkpoint_of_the_mlp_form_names_the_option_that_loads_it(tiny_config, tmp_path):
    config = tiny_config(**{"method": "prefix", "prefix.projection": 8, "prefix.save": "mlp"})
    recipe = Recipe(config)
    checkpoint.save(tmp_path, recipe.method, config, recipe.fingerprint, recipe.backbone.source)
    assert Recipe.from_checkpoint(tmp_path).method.config.prefix.save == "mlp"
    with pytest.raises(UserError, match=r"checkpoint .*prefix\.save=mlp"):
        Recipe.from_checkpoint(tmp_path, {"prefix.save": "prefix"})


def test_multi_token_label_words_are_compared_per_token(tiny_config):
    """A two-token label word whose tokens are each likelier than a one-token word's token wins:
    summed ELBOs would favour the shorter word (about 2 x -0.7 < -1.0)."""
    recipe = Recipe(tiny_config())
    short, long = 2000, 2001
    recipe.label_ids = [[short], [long, long]]
    V = len(recipe.tokenizer)
    logp = torch.full((V,), float(torch.log(1 - torch.exp(torch.tensor(-1.0)) - torch.exp(torch.tensor(-0.7))))
                      - torch.log(torch.tensor(V - 2.0)))
    logp[short], logp[long] = -1.0, -0.7

    def denoise(ids, attn, select, t, prompt_mask=None, task_ids=None):
        return logp.expand(int(select.sum()), V)

    recipe.denoise = denoise
    times = diffusion.stratified_times([0.0, 1.0], 64, recipe.config.diffusion.t_min)
    assert evaluation.elbo_predictions(recipe, recipe.validation_examples[:8], times) == [1] * 8


def test_sampler_accuracy_says_which_times_it_exercises(tiny_config):
    recipe = Recipe(tiny_config(**{"diffusion.sampler_steps": 4}))
    out = recipe.evaluate(recipe.validation_examples[:4], "validation", sampler=True)
    note = out["validation/accuracy_sampler_note"]
    assert "1-token answer slot at t = 1 (linear schedule, 4 steps)" in note and "only" in note
