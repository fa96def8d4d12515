"""Generation tasks: metrics against hand-computed values, the response-length scheme (answer then
end tokens, cut at the first end token), the sampler running each step with its own t, and
xquad / xsum runs reporting generated-text scores beside the ELBO."""

import pytest

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
