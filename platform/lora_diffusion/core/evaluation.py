"""Classification accuracy by the ELBO and by the sampler, without forwards that change nothing.

Where a default sweep trial's final evaluation spends its time (cProfile, MiniLM, SST-2): about
99% in the backbone's blocks (the linear layers alone about 80%), the head at the answer slot
about 2%, tokenisation and Python about 1%. So the savings are forwards not run, and each leaves
every row's numbers as they were (up to float rounding of a batch's padded width):

- Shared blocks. With one-token label words, every t point of the ELBO and the sampler's first
  step see the same input (the prompt and a masked answer slot); only the Context differs.
  Blocks whose forward the Context cannot change (`Method.context_free_blocks`: those up to the
  trajectory injection point) run once per batch and the other forwards replay their outputs; a
  method that reads no Context gives the same logits at every t, computed once.
- Length-sorted batches. Rows are batched in order of prompt length (predictions go back to row
  order), so a batch is padded to rows like its own: batches of 64 random SST-2 rows are 40%
  padding (validation, test), 60% (train phrases). Only where evaluation draws no random
  numbers (one-token label words): multi-token candidates draw their masks per batch, and
  sorting would change the draws.
- The final result's validation score at the last step is the last periodic one (Recipe.evaluate).
"""

from __future__ import annotations

import math

import torch

from . import diffusion, tasks
from .diffusion import seeded

# Rows per evaluation batch: `evaluation.batch_size` (config.py), everywhere a split is scored
# (Recipe.evaluate, the diagnostics), so the phase gains draw their masks exactly as the test
# ELBO they are read against (the masks are drawn per batch).


class SharedForward:
    """A `Denoise` for the forwards of one batch at several t. A forward whose ids, attention and
    selected positions equal the last recorded one's replays the outputs of the method's
    context-free blocks (their forward hooks still run, on the replayed output) or, for a method
    that reads no Context, returns the recorded logits; any other forward runs in full."""

    def __init__(self, recipe, batch: diffusion.Batch):
        self.denoise = recipe.denoiser(batch)
        self.depth = shareable_depth(recipe)
        self.blocks = list(recipe.backbone.layers)[:self.depth or 0]
        self.key: tuple | None = None  # copies of (ids, attention, select) of the recorded forward
        self.saved: list = []  # the blocks' raw outputs, or [logits] when depth is None

    def __call__(self, ids, attention_mask, select, t):
        inputs = (ids, attention_mask, select)
        same = self.key is not None and all(torch.equal(a, b) for a, b in zip(self.key, inputs))
        if self.depth == 0:
            return self.denoise(ids, attention_mask, select, t)
        if same and self.depth is None:
            return self.saved[0].clone()  # the sampler writes into its logits
        if same:
            return self._replayed(ids, attention_mask, select, t)
        self.key = tuple(x.clone() for x in inputs)  # the sampler edits its ids in place
        if self.depth is None:
            self.saved = [self.denoise(ids, attention_mask, select, t)]
            return self.saved[0].clone()
        self.saved = [None] * len(self.blocks)
        # prepend: record each block's own output, before any method hook rewrites it
        handles = [b.register_forward_hook(self._recorder(j), prepend=True) for j, b in enumerate(self.blocks)]
        try:
            return self.denoise(ids, attention_mask, select, t)
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, j: int):
        def record(_module, _inputs, output):
            self.saved[j] = output
        return record

    def _replayed(self, ids, attention_mask, select, t):
        own = [block.__dict__.get("forward") for block in self.blocks]  # activation checkpointing's
        for block, output in zip(self.blocks, self.saved):
            block.forward = _returning(output)  # an instance attribute: hooks still run around it
        try:
            return self.denoise(ids, attention_mask, select, t)
        finally:
            for block, forward in zip(self.blocks, own):
                if forward is None:
                    del block.forward  # back to the class's forward
                else:
                    block.forward = forward


def shareable_depth(recipe) -> int | None:
    """The method's context-free blocks (None: its logits ignore the Context), or 0 on a
    backbone that takes the time itself (MDLM's blocks are conditioned on sigma(t)): there no
    block's output is the same at two t."""
    if recipe.backbone.family.time_argument:
        return 0
    return recipe.method.context_free_blocks()


def _returning(output):
    return lambda *args, **kwargs: output


def length_order(recipe, examples) -> list[int]:
    """Row indices by prompt length (stable), for batches padded to rows like their own."""
    prompts = recipe.tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    return sorted(range(len(examples)), key=lambda i: len(prompts[i]))


def classify(recipe, examples, times, *, elbo: bool, sampler: bool,
             batch_size: int) -> tuple[list[int] | None, list[int] | None]:
    """(ELBO predictions, sampler predictions) in row order; None for the one not asked for."""
    one_token = all(len(ids) == 1 for ids in recipe.label_ids)
    order = length_order(recipe, examples) if one_token else list(range(len(examples)))
    by_elbo, by_sampler = [0] * len(examples), [0] * len(examples)
    for i in range(0, len(examples), batch_size):
        rows = order[i:i + batch_size]
        chunk = [examples[j] for j in rows]
        shared = None
        if one_token:  # the ELBO's t points and the sampler's one step share their input
            batch = recipe.encode(chunk, [[recipe.backbone.mask_token_id]] * len(chunk))
            shared = (batch, SharedForward(recipe, batch))
        if elbo:
            for j, p in zip(rows, elbo_predictions(recipe, chunk, times, shared)):
                by_elbo[j] = p
        if sampler:
            for j, p in zip(rows, sampler_predictions(recipe, chunk, shared)):
                by_sampler[j] = p
    return (by_elbo if elbo else None), (by_sampler if sampler else None)


def elbo_predictions(recipe, chunk, times, shared=None) -> list[int]:
    """The label word of highest ELBO, t stratified over `times`; `shared`: the chunk's
    one-token-slot batch and its SharedForward (one-token label words only)."""
    c, mask_id = recipe.config, recipe.backbone.mask_token_id
    if all(len(ids) == 1 for ids in recipe.label_ids):  # one forward per t scores all labels
        if shared is None:
            batch = recipe.encode(chunk, [[mask_id]] * len(chunk))
            shared = (batch, recipe.denoiser(batch))
        scores = diffusion.score_label_words(shared[1], shared[0], [ids[0] for ids in recipe.label_ids],
                                             c.diffusion.noise_schedule, times, mask_id)
        return scores.argmax(1).tolist()
    per_label = []
    for ids in recipe.label_ids:  # multi-token label words: score each candidate's ELBO ...
        batch = recipe.encode(chunk, [ids] * len(chunk))
        elbo = diffusion.score_candidates(recipe.denoiser(batch), batch, mask_id, c.diffusion.noise_schedule,
                                          times, seeded(c.train.seed, 11))
        per_label.append(elbo / len(ids))  # ... per token: a sum would favour short words
    return torch.stack(per_label, 1).argmax(1).tolist()


def sampler_predictions(recipe, chunk, shared=None) -> list[int]:
    """Generate the answer slot; a generation that is no label word counts as wrong (-1)."""
    c, label_ids = recipe.config, recipe.label_ids
    length = max(len(ids) for ids in label_ids)
    if shared is None:
        batch = recipe.encode(chunk, [[recipe.backbone.mask_token_id] * length] * len(chunk))
        shared = (batch, recipe.denoiser(batch))
    batch, denoise = shared
    ids = diffusion.sample(denoise, batch, recipe.backbone.mask_token_id, c.diffusion.sampler_steps,
                           c.diffusion.remasking, seeded(c.train.seed, 13), c.diffusion.noise_schedule)
    pad = recipe.tokenizer.pad_token_id
    preds = []
    for row, resp in zip(ids, batch.response_mask):
        generated = row[resp].tolist()
        preds.append(next((k for k, lab in enumerate(label_ids) if generated[:len(lab)] == lab
                           and all(g == pad for g in generated[len(lab):])), -1)
                     if length > 1 else next((k for k, lab in enumerate(label_ids) if generated == lab), -1))
    return preds


def sampler_note(recipe) -> str:
    """Which times the sampler's accuracy exercises: the answer slot's tokens are revealed
    only at the steps `transfer_counts` gives them (a one-token label word: the first, t = 1)."""
    d = recipe.config.diffusion
    length = max(len(ids) for ids in recipe.label_ids)
    counts = diffusion.transfer_counts(length, d.sampler_steps, d.noise_schedule)
    at = [t for t, n in zip(diffusion.step_times(d.sampler_steps), counts) if n]
    note = (f"the sampler reveals the {length}-token answer slot at t = "
            f"{', '.join(f'{t:g}' for t in at)} ({d.noise_schedule} schedule, {d.sampler_steps} steps)")
    if len(at) == 1:
        note += (": accuracy_sampler exercises only what runs at that t (a trajectory method: "
                 "one phase's module); accuracy (ELBO, t stratified over every phase) covers the rest")
    return note


def accuracy_se(accuracy: float, rows: int) -> float:
    """The standard error of an accuracy over `rows` rows, sqrt(p (1 - p) / n): the noise a
    validation subset leaves in the selection metric (861 SST-2 rows at 0.8: 0.014; a
    200-row subset: 0.028), so two trials closer than about twice it are not told apart."""
    return math.sqrt(accuracy * (1 - accuracy) / rows)


def classification(recipe, examples, split: str, times, sampler: bool, batch_size: int,
                   known: dict) -> dict:
    """`<split>/accuracy` (ELBO) with its standard error `accuracy_se` and, when `sampler`,
    `accuracy_sampler` with its note; the accuracy already in `known` (this split scored at this
    step and these parameters) is kept."""
    need_elbo = f"{split}/accuracy" not in known
    by_elbo, by_sampler = classify(recipe, examples, times, elbo=need_elbo, sampler=sampler,
                                   batch_size=batch_size)
    accuracy = tasks.accuracy(by_elbo, examples) if need_elbo else known[f"{split}/accuracy"]
    out = {f"{split}/accuracy": accuracy, f"{split}/accuracy_se": accuracy_se(accuracy, len(examples))}
    if sampler:
        out[f"{split}/accuracy_sampler"] = tasks.accuracy(by_sampler, examples)
        out[f"{split}/accuracy_sampler_note"] = sampler_note(recipe)
    return out
