"""Generation tasks: metrics against hand-computed values, the response-length scheme (answer then
end tokens, cut at the first end token), the sampler running each step with its own t, and
xquad / xsum runs reporting generated-text scores beside the ELBO."""

import math

import pytest
import torch

from lora_diffusion.core import diffusion, generation
from lora_diffusion.core.errors import UserError
from lora_diffusion.core.metrics import rouge, score_generations, squad_f1_em
from lora_diffusion.core.recipe import Recipe

# room for the synthetic XQuAD question after the context is cut from the left
GENERATION_SETS = {"max_length": 48, "generation.response_tokens": 6, "max_eval_examples": 6}


def test_squad_exact_match_and_f1_by_hand():
    # articles and punctuation are normalised away: exact match
    assert squad_f1_em("The Eiffel Tower.", ["an eiffel tower"]) == (1.0, 1.0)
    # "in 1857 by her" vs "1857": 1 common of 4 predicted, 1 of 1 gold: P 1/4, R 1, F1 2(1/4)/(5/4) = 0.4
    assert squad_f1_em("in 1857, by her", "1857") == pytest.approx((0.4, 0.0))
    # several references: the best of each (F1 from "Paris France" = 1.0 here, EM from it too)
    assert squad_f1_em("Paris, France", ["Paris", "paris france!"]) == (1.0, 1.0)
    # a repeated token counts as often as both sides have it: "x x y" vs "x y": common x:1, y:1 = 2;
    # P 2/3, R 1, F1 = 0.8
    assert squad_f1_em("x x y", "x y") == pytest.approx((0.8, 0.0))
    scores = score_generations("squad", ["the Eiffel tower", "in 1857, by her"],
                               [("Eiffel Tower",), ("1857", "in 1857")])
    # second row: best reference "in 1857": common 2, P 2/4, R 1, F1 2/3
    assert scores == pytest.approx({"exact_match": 0.5, "f1": (1.0 + 2 / 3) / 2})


def test_rouge_by_hand():
    """'police arrested the man' vs 'the police arrested a man on friday' (stemmed, lowercased):
    unigrams 4 common: P 4/4, R 4/7, F 8/11; bigrams: only 'police arrested': P 1/3, R 1/6,
    F 2/9; LCS 'police arrested man' = 3: P 3/4, R 3/7, F 6/11."""
    got = rouge("Police arrested the man.", "The police arrested a man on Friday")
    assert got == pytest.approx({"rouge1": 8 / 11, "rouge2": 2 / 9, "rougeL": 6 / 11})
    means = score_generations("rouge", ["police arrested the man", "dogs"],
                              [("the police arrested a man on friday",), ("cats",)])
    assert means == pytest.approx({"rouge1": 4 / 11, "rouge2": 1 / 9, "rougeL": 3 / 11})


def test_responses_are_padded_with_end_tokens_and_decoding_cuts_at_the_first(tiny_backbone_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    end = generation.end_token_id(tok)
    assert end == tok.sep_token_id  # BERT: no EOS, so [SEP]
    words = tok("in 1857", add_special_tokens=False)["input_ids"]
    assert generation.response_ids(tok, "in 1857", 6) == words + [end] * (6 - len(words))
    assert generation.response_ids(tok, "in 1857 by her own hand", 2) == words[:2]  # cut, no end
    assert generation.cut_at_end([5, 6, end, 7, end], end) == [5, 6]
    assert generation.cut_at_end([5, 6], end) == [5, 6]


def _padded_batch(pad_tokens=(3, 3)):
    """One row [CLS] prompt | a b END <pad_tokens>, the response 5 tokens; END = 3, [MASK] = 0."""
    ids = torch.tensor([[5, 6, 1, 2, 3, *pad_tokens]])
    response = torch.tensor([[False, False, True, True, True, True, True]])
    return diffusion.Batch(ids, torch.ones_like(ids), response, torch.zeros_like(response))


def _loss(batch, weight, t_min=1e-3, V=8):
    """The loss under a denoiser that ignores context: uniform logits (CE log 8 = 3 log 2), except
    at positions whose clean token is END = 3, where p(END) = 1/2 (CE log 2)."""
    def denoise(ids, attn, select, t):
        logits = torch.zeros(int(select.sum()), V)
        logits[batch.input_ids[select] == 3, 3] = math.log(V - 1)
        return logits

    weights = None if weight is None else generation.token_weights(batch, 3, weight)
    return diffusion.diffusion_loss(denoise, batch, 0, "linear", t_min, torch.Generator().manual_seed(0),
                                    weights)[0]


def test_end_token_weight_weighs_the_padding_after_the_first_end_token():
    batch = _padded_batch()
    assert generation.token_weights(batch, 3, 0.25).tolist() == [[1, 1, 1, 1, 1, 0.25, 0.25]]
    # t = 1 masks everything and w(1) = 1: answer 2 x 3 log 2, first END log 2, padding 2 w log 2,
    # over the weighted count 3 + 2 w
    for w, expected in ((0.5, 8 / 4), (1.0, 9 / 5), (0.0, 7 / 3)):
        assert float(_loss(batch, w, t_min=1.0)) == pytest.approx(expected * math.log(2))
    # weight 1 is exactly the loss without weights
    assert torch.equal(_loss(batch, 1.0), _loss(batch, None))
    # weight 0: what the padding positions hold no longer matters (with weight 1 it does)
    other = _padded_batch(pad_tokens=(1, 4))
    assert generation.token_weights(other, 3, 0.0).tolist() == generation.token_weights(batch, 3, 0.0).tolist()
    assert torch.equal(_loss(other, 0.0), _loss(batch, 0.0))
    assert not torch.equal(_loss(other, 1.0), _loss(batch, 1.0))
    no_end = diffusion.Batch(*(x[:, :4] for x in (batch.input_ids, batch.attention_mask,
                                                   batch.response_mask, batch.prompt_mask)))
    assert generation.token_weights(no_end, 3, 0.0).tolist() == [[1, 1, 1, 1]]  # answer cut: no padding


def test_training_uses_the_end_token_weight_and_the_elbo_does_not(tiny_config, monkeypatch):
    """The training loss gets the weights; the reported ELBO stays the bound on the whole padded
    reference (the same number, before training, whatever the weight)."""
    seen, elbos, weigh = [], [], diffusion.token_loss_weights
    monkeypatch.setattr(diffusion, "token_loss_weights",  # what Recipe.train_step weighs the loss by
                        lambda batch, noise, schedule, token_weight=None:
                        seen.append((batch, token_weight)) or weigh(batch, noise, schedule, token_weight))
    times = diffusion.stratified_times([0, 0.5, 1], 2, 1e-3)
    for weight in (1.0, 0.0):
        recipe = Recipe(tiny_config(task="xquad", **GENERATION_SETS,
                                    **{"generation.end_token_weight": weight}))
        elbos.append(float(generation.reference_elbo_by_point(recipe, recipe.validation_examples[:4], times, 8,
                                                              diffusion_generator()).sum()))
        recipe.train_step()
    assert elbos[0] == elbos[1]
    (_, default), (batch, weights) = seen
    assert default is None  # weight 1: today's loss, untouched
    assert torch.equal(weights, generation.token_weights(batch, generation.end_token_id(recipe.tokenizer), 0.0))
    assert (weights == 0).any() and (weights[batch.response_mask] == 1).any()


def test_generated_prompt_spans_keep_the_prompt_spelling(tiny_backbone_dir):
    """WordPiece decoding spaces out punctuation ("1, 857"); a run of the prompt's tokens takes the
    prompt's characters, so a copied answer can match exactly; other tokens are decoded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    prompt = "Context: The planet's 1,857 rainforests.\nQuestion: How many?\nAnswer:"
    ids = tok("planet's 1,857", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) != "planet's 1,857"
    assert generation.surface_text(tok, ids, prompt) == "planet's 1,857"
    other = tok("1,858", add_special_tokens=False)["input_ids"]
    assert generation.surface_text(tok, other, prompt) == tok.decode(other)
    assert generation.surface_text(tok, [], prompt) == ""


def test_sampler_runs_each_step_with_its_own_t(tiny_config):
    """Generation calls the method once per reverse step, with that step's t for every row, from
    t = 1 down: each step runs the module of its own t."""
    recipe = Recipe(tiny_config(task="xquad", method="trajectory", **GENERATION_SETS,
                                **{"diffusion.sampler_steps": 3}))
    seen, set_context = [], recipe.method.set_context

    def spy(context):
        if context is not None:
            seen.append(context.t.tolist())
        set_context(context)

    recipe.method.set_context = spy
    texts = generation.generate(recipe, recipe.validation_examples[:2], 8, diffusion_generator())
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert diffusion.step_times(3)[:3] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert seen == [pytest.approx([t, t]) for t in diffusion.step_times(3)[:3]]


def test_generation_decodes_in_blocks_of_block_length(tiny_config):
    """6 response tokens in blocks of 3, 6 steps: the first 3 steps predict only the first block's
    slots, the last 3 only the second's."""
    recipe = Recipe(tiny_config(task="xquad", method="trajectory", **GENERATION_SETS,
                                **{"diffusion.block_length": 3}))
    seen, denoiser = [], recipe.denoiser

    def spy(batch):
        def denoise(ids, attn, select, t):
            slot = batch.response_mask.long().cumsum(1) - 1  # 0..5 along the response
            seen.append(sorted(set(slot[select].tolist())))
            return denoiser(batch)(ids, attn, select, t)
        return denoise

    recipe.denoiser = spy
    generation.generate(recipe, recipe.validation_examples[:2], 8, diffusion_generator())
    assert len(seen) == 6
    assert all(max(s) < 3 for s in seen[:3]) and all(min(s) >= 3 for s in seen[3:])


def test_block_length_and_end_token_weight_are_validated(tiny_config):
    default = tiny_config(task="xquad")
    assert (default.diffusion.block_length, default.generation.end_token_weight) == (None, 1.0)
    for block in (4, 5, 16, 40):  # 16 tokens: 4 blocks (of 4; of 5, the last 1), then 1 block
        assert tiny_config(task="xquad", **{"diffusion.block_length": block}).diffusion.block_length == block
    bad_blocks = [{"diffusion.block_length": b} for b in (0, -2, 1.5, "four")]
    bad_blocks.append({"diffusion.block_length": 4, "diffusion.sampler_steps": 6})  # 4 blocks
    for sets in bad_blocks:
        with pytest.raises(UserError, match="diffusion.block_length"):
            tiny_config(task="xquad", **sets)
    assert tiny_config(task="xquad", **{"generation.end_token_weight": 0}).generation.end_token_weight == 0.0
    for weight in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(UserError, match="generation.end_token_weight"):
            tiny_config(task="xquad", **{"generation.end_token_weight": weight})


def diffusion_generator():
    import torch

    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("task,remasking,scores", [
    ("xquad", "low_confidence", ("exact_match", "f1")),
    ("xsum", "random", ("rouge1", "rouge2", "rougeL"))])
def test_generation_run_reports_field_scores_and_the_elbo(tiny_config, task, remasking, scores):
    result = Recipe(tiny_config(task=task, **GENERATION_SETS, **{
        "diffusion.remasking": remasking, "train.eval_every": 4})).run(log=None)
    for split in ("validation", "test"):
        for name in scores:
            assert 0.0 <= result[f"{split}/{name}"] <= 1.0
        assert result[f"{split}/elbo_nats_per_token"] > 0
        assert result[f"{split}/generation_s_per_example"] > 0
        assert 1 <= result[f"{split}/examples"] <= 6
        samples = result[f"samples_{split}"]  # what was scored, readable in result.json
        assert 1 <= len(samples) <= 5 and all(isinstance(s["generated"], str) and s["references"] for s in samples)
    assert "train/elbo_nats_per_token" in result and f"train/{scores[0]}" not in result
    assert "validation/accuracy" not in result


def test_task_defaults_for_response_length_and_sampler_steps(tiny_config):
    xquad, xsum, sst2 = (tiny_config(task=t, max_length=64) for t in ("xquad", "xsum", "sst2"))
    assert (xquad.generation.response_tokens, xquad.diffusion.sampler_steps) == (16, 16)
    assert (xsum.generation.response_tokens, xsum.diffusion.sampler_steps) == (32, 32)
    assert (sst2.generation.response_tokens, sst2.diffusion.sampler_steps) == (None, 4)  # unchanged
    assert tiny_config(task="xquad", **{"diffusion.sampler_steps": 4}).diffusion.sampler_steps == 4
    with pytest.raises(UserError, match="generation.response_tokens"):
        tiny_config(task="xsum", max_length=32)  # 32 summary tokens leave no room for the document


def test_sweeps_select_generation_tasks_on_their_field_metric():
    from lora_diffusion.engine.callbacks import view_metrics
    from lora_diffusion.engine.spec import selection_metric

    assert [selection_metric(t) for t in ("sst2", "ag_news", "xquad", "xsum")] == [
        "validation/accuracy", "validation/accuracy", "validation/f1", "validation/rougeL"]
    assert view_metrics("validation/f1")[:2] == ["final/validation/f1", "final/test/f1"]
    assert view_metrics()[:2] == ["final/validation/accuracy", "final/test/accuracy"]  # unchanged
