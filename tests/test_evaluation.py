"""Cheap evaluation gives the numbers full evaluation gives: shared blocks across t points, the
sampler's first step on the same forwards, length-sorted batches and the final result's reuse
of the last periodic score change no accuracy, ELBO score or generation score."""

import pytest
import torch

from lora_diffusion.core import diffusion, evaluation
from lora_diffusion.core.diffusion import seeded
from lora_diffusion.core.recipe import Recipe

GENERATION_SETS = {"max_length": 48, "generation.response_tokens": 6, "max_eval_examples": 6}
METHODS = {  # tiny backbone: 2 blocks
    "trajectory, injected after block 0": ({"method": "trajectory", "trajectory.injection_layers": [0]}, 1),
    "trajectory, on the last hidden state": ({"method": "trajectory", "trajectory.injection_layers": [-1]}, 2),
    "trajectory, shared module": ({"method": "trajectory", "trajectory.sharing": "shared"}, 1),
    "trajectory_adapter": ({"method": "trajectory_adapter"}, 0),
    "weight LoRA (PEFT)": ({"method": "lora"}, None),
}


def trained_like(recipe: Recipe) -> Recipe:
    """Random non-zero trainable tensors (B starts at zero): every phase's module changes the
    logits, so a replay that carried one t's module into another t would show."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in recipe.method.trainable().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    recipe.method.eval()
    return recipe


def full_forwards(recipe, examples, times, batch_size=64):
    """The evaluation before core/evaluation.py: rows in file order, every t point and the
    sampler a forward of the whole network. (label scores [N, labels], sampled slot ids [N])"""
    c, mask = recipe.config, recipe.backbone.mask_token_id
    scores, sampled = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = recipe.encode(chunk, [[mask]] * len(chunk))
        scores.append(diffusion.score_label_words(recipe.denoiser(batch), batch, [ids[0] for ids in recipe.label_ids],
                                                  c.diffusion.noise_schedule, times, mask))
        ids = diffusion.sample(recipe.denoiser(batch), batch, mask, c.diffusion.sampler_steps,
                               c.diffusion.remasking, seeded(c.train.seed, 13), c.diffusion.noise_schedule)
        sampled += ids[batch.response_mask].tolist()
    return torch.cat(scores), sampled


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name", list(METHODS))
def test_shared_blocks_give_the_scores_of_full_forwards(tiny_config, name):
    sets, depth = METHODS[name]
    recipe = trained_like(Recipe(tiny_config(**sets, **{"trajectory.num_phases": 4,
                                                        "diffusion.eval_t_points": 4})))
    assert recipe.method.context_free_blocks() == depth
    c, mask = recipe.config, recipe.backbone.mask_token_id
    times = diffusion.stratified_times(recipe.method.phase_boundaries(), 4, c.diffusion.t_min)
    examples = recipe.validation_examples
    expected, expected_sampled = full_forwards(recipe, examples, times)
    if depth:  # scores at different t differ, else the check below would prove nothing
        assert not torch.allclose(expected[:, 0], full_forwards(recipe, examples, times[:1])[0][:, 0])
    batch = recipe.encode(examples, [[mask]] * len(examples))
    shared = evaluation.SharedForward(recipe, batch)
    first_block = count_calls(recipe.backbone.layers[0].attention)
    scores = diffusion.score_label_words(shared, batch, [ids[0] for ids in recipe.label_ids],
                                         c.diffusion.noise_schedule, times, mask)
    ids = diffusion.sample(shared, batch, mask, c.diffusion.sampler_steps, c.diffusion.remasking,
                           seeded(c.train.seed, 13), c.diffusion.noise_schedule)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert ids[batch.response_mask].tolist() == expected_sampled
    # 4 t points and the sampler's step: one forward through block 0 unless nothing is shared
    assert len(first_block) == (5 if depth == 0 else 1)
    assert all("forward" not in vars(b) for b in recipe.backbone.layers)  # the blocks are restored


@pytest.mark.parametrize("name", ["trajectory, injected after block 0", "weight LoRA (PEFT)"])
def test_evaluate_reports_the_accuracies_of_full_forwards(tiny_config, name):
    """Length-sorted batches (rows of different lengths, batches of 5) and predictions put back
    in row order: the same accuracies as rows in file order."""
    recipe = trained_like(Recipe(tiny_config(**METHODS[name][0], max_eval_examples=None)))
    labels = [ids[0] for ids in recipe.label_ids]
    examples = recipe.validation_examples
    assert len({len(e.prompt) for e in examples}) > 1
    times = diffusion.stratified_times(recipe.method.phase_boundaries(), recipe.config.diffusion.eval_t_points,
                                       recipe.config.diffusion.t_min)
    scores, sampled = full_forwards(recipe, examples, times)
    by_sampler = [labels.index(s) if s in labels else -1 for s in sampled]
    by_elbo, by_sampler_now = evaluation.classify(recipe, examples, times, elbo=True, sampler=True, batch_size=5)
    assert by_elbo == scores.argmax(1).tolist() and by_sampler_now == by_sampler
    out = recipe.evaluate(examples, "validation", batch_size=5)
    assert out["validation/accuracy"] == sum(
        int(p) == e.label for p, e in zip(scores.argmax(1), examples)) / len(examples)
    assert out["validation/accuracy_sampler"] == sum(
        p == e.label for p, e in zip(by_sampler, examples)) / len(examples)


def test_length_sorted_batches_put_predictions_back_in_row_order(tiny_config):
    """A denoiser whose label scores are a function of the row's tokens (so predictions differ
    from row to row): each row gets the prediction it gets when scored alone."""
    recipe = Recipe(tiny_config(max_eval_examples=None))
    labels, vocab, mask = [ids[0] for ids in recipe.label_ids], len(recipe.tokenizer), recipe.backbone.mask_token_id

    def denoise(ids, attn, select, t, prompt_mask=None, task_ids=None):
        logits = torch.zeros(len(ids), vocab)
        logits[:, labels[0]] = ((ids * attn).sum(1) % 7).float()
        logits[:, labels[1]] = 3.5  # no ties: the ELBO and the sampler break them differently
        return logits[select.any(1)]

    recipe.denoise = denoise
    examples = recipe.validation_examples
    alone = [int(denoise(b.input_ids, b.attention_mask, b.response_mask, None)[0, labels].argmax())
             for b in (recipe.encode([e], [[mask]]) for e in examples)]
    assert len(set(alone)) == 2 and evaluation.length_order(recipe, examples) != list(range(len(examples)))
    by_elbo, by_sampler = evaluation.classify(recipe, examples, [(0.5, 1.0)], elbo=True, sampler=True, batch_size=3)
    assert by_elbo == alone and by_sampler == alone


def test_the_final_result_reuses_the_last_validation_score_and_nothing_stale(tiny_config, monkeypatch):
    recipe = trained_like(Recipe(tiny_config(**{"train.steps": 2, "train.eval_every": 2})))
    calls = []
    classify = evaluation.classify
    monkeypatch.setattr(evaluation, "classify", lambda *a, **k: calls.append(k["elbo"]) or classify(*a, **k))
    periodic = recipe.evaluate(recipe.validation_examples, "validation", sampler=False)
    final = recipe.evaluate(recipe.validation_examples, "validation")
    assert calls == [True, False] and final["validation/accuracy"] == periodic["validation/accuracy"]
    recipe._evaluated.clear()
    assert recipe.evaluate(recipe.validation_examples, "validation") == final  # as computed afresh
    trained_like(recipe)  # new parameters at the same step: scored again
    recipe.evaluate(recipe.validation_examples, "validation", sampler=False)
    recipe.train_step()
    recipe.evaluate(recipe.validation_examples, "validation", sampler=False)
    assert calls == [True, False, True, True, True]


def test_a_generation_tasks_final_validation_is_the_periodic_one(tiny_config, monkeypatch):
    """Generation evaluates generated text at every evaluation: the final result's validation,
    at the same step, is the last periodic one, and equals one computed afresh."""
    from lora_diffusion.core import generation

    recipe = Recipe(tiny_config(task="xquad", **GENERATION_SETS, **{"train.steps": 2, "train.eval_every": 2}))
    calls = []
    evaluate = generation.evaluate
    monkeypatch.setattr(generation, "evaluate", lambda *a, **k: calls.append(a[2]) or evaluate(*a, **k))
    result = recipe.run(log=None)
    assert calls == ["validation", "train", "test"]  # validation once, at step 2
    recipe._evaluated.clear()
    fresh = recipe.evaluate(recipe.validation_examples, "validation")
    timing = "validation/generation_s_per_example"
    assert {k: v for k, v in fresh.items() if k != timing} == {  # per_t: core/diagnostics.py
        k: v for k, v in result.items()
        if (k.startswith("validation/") or k == "samples_validation") and k != timing and "/per_t/" not in k}


def test_a_time_conditioned_backbone_shares_no_forward(tiny_config, tmp_path):
    """MDLM's blocks read sigma(t): even weight LoRA (whose own modules ignore t) gets different
    logits at each t there, so evaluation must run every forward in full."""
    from support import tiny_families

    path = tiny_families.build("mdlm", tmp_path / "mdlm")
    recipe = trained_like(Recipe(tiny_config(method="lora", backbone=str(path), trust_remote_code=True,
                                             **{"diffusion.eval_t_points": 4})))
    assert recipe.method.context_free_blocks() is None and evaluation.shareable_depth(recipe) == 0
    c, mask = recipe.config, recipe.backbone.mask_token_id
    times = diffusion.stratified_times(recipe.method.phase_boundaries(), 4, c.diffusion.t_min)
    examples = recipe.validation_examples
    expected, _ = full_forwards(recipe, examples, times)
    batch = recipe.encode(examples, [[mask]] * len(examples))
    scores = diffusion.score_label_words(evaluation.SharedForward(recipe, batch), batch,
                                         [ids[0] for ids in recipe.label_ids], c.diffusion.noise_schedule, times, mask)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_a_scored_split_states_the_standard_error_of_its_accuracy(tiny_config):
    """Beside each accuracy, sqrt(p (1 - p) / n) of its rows: the noise a validation subset
    leaves in the selection metric, the same whether scored now or reused from the last score."""
    recipe = Recipe(tiny_config(max_eval_examples=12))
    rows = recipe.validation_examples
    out = recipe.evaluate(rows, "validation", sampler=False)
    p = out["validation/accuracy"]
    assert len(rows) == 12 and out["validation/accuracy_se"] == pytest.approx((p * (1 - p) / 12) ** 0.5)
    assert recipe.evaluate(rows, "validation", sampler=True)["validation/accuracy_se"] == out["validation/accuracy_se"]
    assert evaluation.accuracy_se(0.8, 861) == pytest.approx(0.01363, abs=1e-5)
