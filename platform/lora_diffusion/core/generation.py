"""Generation tasks in evaluation (xquad, xsum): the response-length scheme, decoding by the
reverse sampler, and the scores each task's field uses.

Response length. A masked diffusion LM fills a fixed number of masked slots, but an answer's
length is unknown at inference. As in LLaDA's SFT, every training response is the answer (cut
to `generation.response_tokens`) followed by end tokens up to that length, and the loss covers
the end tokens too, so the model learns where an answer ends. At inference the response is
`response_tokens` masks, and decoding cuts at the first end token. The end token is the
tokenizer's EOS, else its SEP ([SEP] for BERT-family backbones, the token that closes every
encoded row). `generation.end_token_weight` (default 1, LLaDA's loss) weighs the end tokens after
the first: the first always counts fully, it teaches where the answer stops, but the padding
after it is most of a short answer's response (XQuAD: about 3 answer WordPieces, 13 end tokens)
and near-free to predict, so it can drown the answer tokens; 0 leaves it out of the loss. The
loss stays nats per counted token (divided by the weighted count, `diffusion.diffusion_loss`).
The ELBO reported for evaluation does not change meaning with it: it stays the bound on the whole
padded reference, every token weighted 1, so runs with different weights compare on one scale.

Decoding. `diffusion.sample` runs `diffusion.sampler_steps` reverse steps (by default one
token per step). Each step hands its own t to the method (`Recipe.denoise` sets the Context),
so each step runs the module of its t. `diffusion.remasking` picks which predictions each step
keeps: low_confidence (LLaDA's) or random. `diffusion.block_length` (default None: one block)
decodes in blocks of that many tokens, left to right, as LLaDA's semi-autoregressive sampler:
each block gets sampler_steps / blocks steps, still each told its global t.

Scores. xquad: SQuAD exact match and F1, the best over the gold answers; xsum: ROUGE-1/2/L F1
(core/metrics.py). Beside them, for every method, the ELBO bound on the reference response (the
padded one the model trains on, end tokens included), `<split>/elbo_nats_per_token`. The train
split (the train-accuracy subset) gets the ELBO only: generating its 512 rows would take minutes.
`generation.text_scores: false` makes every split ELBO-only: the sampler never runs (no scores of
text, no generation_s_per_example, no samples), and sweeps select on
`validation/elbo_nats_per_token`, lower is better (task_specs.run_metric, metric_mode): for a
backbone whose generated answers score 0 whatever the method. Classification ignores it.
"""

from __future__ import annotations

import time

import torch

from . import diffusion, metrics
from .errors import UserError

SAMPLES_KEPT = 5  # generated texts kept beside a split's scores (`samples_<split>` in the result)


def end_token_id(tokenizer) -> int:
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise UserError("backbone: its tokenizer has neither an EOS nor a SEP token to end responses with")
    return end


def response_ids(tokenizer, text: str, length: int) -> list[int]:
    """The training response: the text's tokens, cut to `length`, then end tokens up to it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return ids + [end_token_id(tokenizer)] * (length - len(ids))


def token_weights(batch: diffusion.Batch, end_id: int, end_weight: float) -> torch.Tensor:
    """Loss weights [B, S]: `end_weight` at the response positions after each row's first end
    token (the padding `response_ids` appends), 1 elsewhere. Found by position, not by token, so
    whatever those positions hold is weighed the same; a response with no end token (an answer
    cut to length, a classification label word) keeps weight 1 throughout."""
    is_end = batch.response_mask & (batch.input_ids == end_id)
    after_first = batch.response_mask & ((is_end.long().cumsum(1) - is_end.long()) > 0)
    return torch.ones(after_first.shape, device=after_first.device).masked_fill(after_first, end_weight)


def train_weights(recipe, batch: diffusion.Batch) -> torch.Tensor | None:
    """The training loss's token weights: None (all 1, the loss unchanged) unless
    generation.end_token_weight < 1."""
    weight = recipe.config.generation.end_token_weight
    return None if weight == 1.0 else token_weights(batch, end_token_id(recipe.tokenizer), weight)


def cut_at_end(ids: list[int], end_id: int) -> list[int]:
    """The generated tokens before the first end token (all of them if there is none)."""
    return ids[:ids.index(end_id)] if end_id in ids else list(ids)


def surface_text(tokenizer, ids: list[int], prompt: str) -> str:
    """The text of generated `ids`: the prompt's own characters where the ids are a contiguous
    run of the prompt's tokens (a fast tokenizer's offsets), else the tokenizer's decoding."""
    if ids and tokenizer.is_fast:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        source, offsets, n = enc["input_ids"], enc["offset_mapping"], len(ids)
        for i in range(len(source) - n + 1):
            if source[i:i + n] == ids:
                return prompt[offsets[i][0]:offsets[i + n - 1][1]]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate(recipe, examples, batch_size: int, generator: torch.Generator) -> list[str]:
    """Each example's response, generated from `response_tokens` masks and decoded to text."""
    c, tokenizer = recipe.config, recipe.tokenizer
    mask_id, end_id = recipe.backbone.mask_token_id, end_token_id(tokenizer)
    slots = [mask_id] * c.generation.response_tokens
    texts = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = recipe.encode(chunk, [slots] * len(chunk))
        ids = diffusion.sample(recipe.denoiser(batch), batch, mask_id, c.diffusion.sampler_steps,
                               c.diffusion.remasking, generator, c.diffusion.noise_schedule,
                               c.diffusion.block_length)
        for example, row, response in zip(chunk, ids, batch.response_mask):
            kept = cut_at_end(row[response].tolist(), end_id)
            texts.append(surface_text(tokenizer, kept, example.prompt))
    return texts


@torch.no_grad()
def reference_elbo_by_point(recipe, examples, times, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Held-out ELBO bound of the reference responses per t of `times`, before the sum over t:
    [len(times)] nats per response token, float64; the whole padded reference, every token
    weighted 1 whatever generation.end_token_weight (module docstring). Its sum is
    `elbo_nats_per_token`; core/diagnostics.py's phase gains split it by phase."""
    c = recipe.config
    total, tokens = torch.zeros(len(times), dtype=torch.float64), 0
    for i in range(0, len(examples), batch_size):
        batch = recipe.encode(examples[i:i + batch_size])
        terms = diffusion.score_points(recipe.denoiser(batch), batch, recipe.backbone.mask_token_id,
                                       c.diffusion.noise_schedule, times, generator)
        total += terms.sum(1).cpu().double()  # on the CPU: float64 is not on every device
        tokens += int(batch.response_mask.sum())
    return -total / max(tokens, 1)


def evaluate(recipe, examples, split: str, times, batch_size: int, sample_generator: torch.Generator) -> dict:
    """`<split>/elbo_nats_per_token` (Recipe.reference_elbo_terms, summed), and except on train
    (or with generation.text_scores false) the task's scores of generated text (exact_match, f1
    or rouge1, rouge2, rougeL) with the sampler's seconds per example."""
    terms = recipe.reference_elbo_terms(examples, times, batch_size)
    out = {f"{split}/elbo_nats_per_token": float(terms.sum())}
    if split == "train" or not recipe.config.generation.text_scores:
        return out
    t0 = time.perf_counter()
    predictions = generate(recipe, examples, batch_size, sample_generator)
    out[f"{split}/generation_s_per_example"] = (time.perf_counter() - t0) / len(examples)
    references = [e.references or (e.response,) for e in examples]
    scores = metrics.score_generations(recipe.spec.metric_family, predictions, references)
    out.update({f"{split}/{name}": value for name, value in scores.items()})
    # what the scores are of, for a reader of result.json (not a metric: no slash in the key)
    out[f"samples_{split}"] = [{"id": e.id, "generated": p, "references": list(r)}
                               for e, p, r in list(zip(examples, predictions, references))[:SAMPLES_KEPT]]
    return out
