"""Absorbing-state (masked) diffusion: noise schedules, the conditional ELBO, the sampler, scoring.

MDLM / LLaDA style. At time t in (0, 1] each response token is replaced by [MASK] with
probability p(t); the prompt stays clean. The network does not see t: anything
timestep-dependent (our trajectory modules) is handed t by the caller through `denoise`.

`denoise(input_ids, attention_mask, select, t) -> logits[N, V]` returns logits only at the
positions in `select` (bool [B, S]): computing the 30k-word output at every position dominates
CPU time, so nothing here ever asks for more.

Two opt-in departures from the plain objective and sampler, both off by default: per-token loss
weights (`diffusion_loss(token_weight=...)`, which generation tasks use to weigh down padding end
tokens) and LLaDA's block-wise semi-autoregressive decoding (`sample(block_length=...)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- schedules


def mask_prob(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """p(t): probability that a token is masked at time t (p(0) = 0, p(1) = 1)."""
    if schedule == "linear":  # LLaDA
        return t
    if schedule == "loglinear":  # MDLM: sigma(t) = -log(1 - (1 - eps) t), p = 1 - e^-sigma
        return (1 - 1e-3) * t
    if schedule == "cosine":
        return 1 - torch.cos(0.5 * math.pi * t)
    raise ValueError(f"unknown noise schedule {schedule!r}")


def elbo_weight(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """w(t) = p'(t) / p(t), the continuous-time ELBO weight (1/t for the linear schedule)."""
    if schedule in ("linear", "loglinear"):
        return 1.0 / t
    if schedule == "cosine":
        half = 0.5 * math.pi
        return half * torch.sin(half * t) / (1 - torch.cos(half * t))
    raise ValueError(f"unknown noise schedule {schedule!r}")


def seeded(*parts: int) -> torch.Generator:
    """A generator seeded from integers (seed, step, ...): every draw is a function of them.

    A CPU generator, whatever device the batch is on: every draw is made here and moved to the
    batch's device (`draw`). The same seed then gives the same masks on a CPU and on a GPU (a
    CUDA generator is a different stream), and the draws are a few floats per token, nothing
    next to the forward they feed."""
    g = torch.Generator()
    g.manual_seed(hash(tuple(parts)) % (2**63))
    return g


def draw(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Uniforms in [0, 1) drawn from the (CPU) generator and moved to `device` (see `seeded`)."""
    return torch.rand(shape, generator=generator).to(device)


def sample_times(batch_size: int, t_min: float, generator: torch.Generator, device=None) -> torch.Tensor:
    """Low-discrepancy t in [t_min, 1] (MDLM): one uniform offset, evenly spaced across the batch."""
    offset = torch.rand((), generator=generator)
    u = (offset + torch.arange(batch_size) / batch_size) % 1.0
    return (t_min + (1 - t_min) * u).to(device or "cpu")


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] long, clean tokens
    attention_mask: torch.Tensor  # [B, S] long
    response_mask: torch.Tensor  # [B, S] bool, the positions diffusion acts on
    prompt_mask: torch.Tensor  # [B, S] bool, prompt tokens (for routers that pool the prompt)
    task_ids: torch.Tensor | None = None  # [B] long, each row's task id (task-conditioned modules)


def encode(tokenizer, prompts: list[str], responses: list[list[int]], max_length: int,
           prompt_tail: int | None | list[int | None] = None) -> Batch:
    """[CLS] prompt response [SEP], right-padded. The response is never truncated. A prompt too
    long keeps its last tokens, because templates end with the cue ("Sentiment:") the answer
    follows; with `prompt_tail`, it keeps its last `prompt_tail` tokens and fills the rest of the
    room from its start, cutting the middle (an XSum document keeps its lead, an XQuAD prompt its
    context's start and the whole question); a list gives each row its own (a task mixture)."""
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    rows, resp_spans, prompt_spans = [], [], []
    tails = prompt_tail if isinstance(prompt_tail, list) else [prompt_tail] * len(prompts)
    for p_ids, r_ids, tail in zip(prompt_ids, responses, tails):
        room = max_length - len(r_ids) - 2
        if room < 1:
            raise ValueError(f"response of {len(r_ids)} tokens does not fit max_length={max_length}")
        p_ids = cut_prompt(p_ids, room, tail)
        rows.append([cls_id, *p_ids, *r_ids, sep_id])
        prompt_spans.append((1, 1 + len(p_ids)))
        resp_spans.append((1 + len(p_ids), 1 + len(p_ids) + len(r_ids)))
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    prompt = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        response[i, slice(*resp_spans[i])] = True
        prompt[i, slice(*prompt_spans[i])] = True
    return Batch(input_ids, attention, response, prompt)


def cut_prompt(ids: list[int], room: int, tail: int | None) -> list[int]:
    if len(ids) <= room:
        return ids
    if tail is None or tail >= room:
        return ids[-room:]
    return ids[:room - tail] + ids[-tail:]


def apply_mask(batch: Batch, t: torch.Tensor, mask_id: int, schedule: str,
               generator: torch.Generator, nonempty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each response token with probability p(t); returns (noisy ids, masked positions).

    With `nonempty`, rows are drawn from the law conditioned on at least one masked token:
    the first masked token j has P(j) = (1-p)^(j-1) p / (1-(1-p)^L), later tokens are masked
    independently with probability p. `elbo_factor` carries the matching weight."""
    device = batch.input_ids.device
    p = mask_prob(t.to(device), schedule)[:, None]
    u = draw(batch.input_ids.shape, generator, device)
    masked = batch.response_mask & (u < p)
    if nonempty:
        empty = ~masked.any(1)
        if empty.any():
            rank = batch.response_mask.cumsum(1)  # 1..L on response positions
            L = batch.response_mask.sum(1, keepdim=True)
            cdf = (1 - (1 - p) ** rank) / (1 - (1 - p) ** L).clamp(min=1e-12)
            v = draw((batch.input_ids.shape[0], 1), generator, device)
            first = (batch.response_mask & (cdf >= v)).float().argmax(1, keepdim=True)
            u2 = draw(batch.input_ids.shape, generator, device)
            pos = torch.arange(batch.input_ids.shape[1], device=device)[None, :]
            redraw = batch.response_mask & ((pos == first) | ((pos > first) & (u2 < p)))
            masked = torch.where(empty[:, None], redraw, masked)
    noisy = torch.where(masked, torch.full_like(batch.input_ids, mask_id), batch.input_ids)
    return noisy, masked


def elbo_factor(t: torch.Tensor, length: torch.Tensor, schedule: str) -> torch.Tensor:
    """w(t) * P(at least one of L tokens masked): the per-row weight of the ELBO estimate when
    masks are drawn with `nonempty=True`. For one token and the linear schedule it is exactly 1."""
    p = mask_prob(t, schedule)
    return elbo_weight(t, schedule) * (1 - (1 - p) ** length)


# ----------------------------------------------------------------------------- loss


@dataclass
class Noise:
    """One training step's draws for a batch: each row's t, the noisy ids, the masked positions."""

    t: torch.Tensor  # [B]
    noisy: torch.Tensor  # [B, S] long
    masked: torch.Tensor  # [B, S] bool


def draw_noise(batch: Batch, mask_id: int, schedule: str, t_min: float, generator: torch.Generator) -> Noise:
    """t and masks for every row of the batch, conditioned on at least one masked token
    (`apply_mask(nonempty=True)`), on the batch's device."""
    t = sample_times(batch.input_ids.shape[0], t_min, generator, batch.input_ids.device)
    noisy, masked = apply_mask(batch, t, mask_id, schedule, generator, nonempty=True)
    return Noise(t, noisy, masked)


def token_loss_weights(batch: Batch, noise: Noise, schedule: str,
                       token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of each masked token's cross-entropy in the loss, [N] in row-major order of
    `noise.masked`: the loss is sum(weight * CE) / B (`diffusion_loss`, whose docstring says what
    the weights are). Computed for the whole batch, so micro-batches add up to the same loss."""
    row = noise.masked.nonzero()[:, 0]
    resp_len = batch.response_mask.sum(1).clamp(min=1).float()
    if token_weight is None:
        return (elbo_factor(noise.t, resp_len, schedule) / resp_len)[row]
    counted = (token_weight * batch.response_mask).sum(1).float()
    counted = torch.where(counted > 0, counted, torch.ones_like(counted))
    return (elbo_factor(noise.t, resp_len, schedule) / counted)[row] * token_weight[noise.masked]


def micro_batch(batch: Batch, noise: Noise, lo: int, hi: int) -> tuple[Batch, Noise]:
    """Rows lo:hi of a batch and its draws (a micro-batch), padding kept: families that take no
    attention mask (MDLM) see the padding, so cutting it would change their output."""
    part = Batch(*(None if x is None else x[lo:hi] for x in (
        batch.input_ids, batch.attention_mask, batch.response_mask, batch.prompt_mask, batch.task_ids)))
    return part, Noise(noise.t[lo:hi], noise.noisy[lo:hi], noise.masked[lo:hi])


def diffusion_loss(denoise: Denoise, batch: Batch, mask_id: int, schedule: str, t_min: float,
                   generator: torch.Generator, token_weight: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Conditional ELBO: E_t[w(t) * sum of CE over masked response tokens] / response length.

    Masks are drawn conditioned on at least one masked token and reweighted (`elbo_factor`): an
    unbiased estimator of the same bound that wastes no sample (with one-token answers a plain
    draw leaves the answer unmasked, and the sample useless, with probability 1 - t).

    `token_weight` ([B, S], None = 1 everywhere) weights each response token's CE by a_i, and a
    row's sum is divided by its weighted count sum_i a_i instead of its length: the loss stays
    nats per counted response token, comparable across weights, and all-ones weights give
    exactly the unweighted loss. Masking (and so `elbo_factor`) still covers every response
    token. Generation tasks set it to weigh down padding (`generation.token_weights`)."""
    B = batch.input_ids.shape[0]
    noise = draw_noise(batch, mask_id, schedule, t_min, generator)
    logits = denoise(noise.noisy, batch.attention_mask, noise.masked, noise.t)  # [N, V]
    targets = batch.input_ids[noise.masked]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (token_loss_weights(batch, noise, schedule, token_weight) * ce).sum() / B
    stats = {
        "masked_tokens": float(noise.masked.sum()),
        "masked_accuracy": float((logits.argmax(-1) == targets).float().mean()),
    }
    return loss, stats


# ----------------------------------------------------------------------------- scoring


def stratified_times(boundaries: list[float], points: int, t_min: float) -> list[tuple[float, float]]:
    """(t, weight) pairs: each phase gets points in proportion to its length (at least one),
    at the midpoints of equal sub-intervals; weights sum to 1."""
    return [(t, w) for t, w, _ in stratified_points(boundaries, points, t_min)]


def stratified_points(boundaries: list[float], points: int, t_min: float) -> list[tuple[float, float, int]]:
    """`stratified_times` with each point's phase (its interval of `boundaries`)."""
    out = []
    for k, (lo, hi) in enumerate(zip(boundaries, boundaries[1:])):
        n = max(1, round(points * (hi - lo)))
        for j in range(n):
            t = lo + (j + 0.5) * (hi - lo) / n
            out.append((max(t, t_min), (hi - lo) / n, k))
    return out


@torch.no_grad()
def score_candidates(denoise: Denoise, batch: Batch, mask_id: int, schedule: str,
                     times: list[tuple[float, float]], generator: torch.Generator) -> torch.Tensor:
    """ELBO estimate of log p(response | prompt) per row, t stratified over `times`: at each t a
    mask conditioned on at least one masked token, weighted by `elbo_factor`. For a one-token
    response and the linear schedule this is exactly sum_t weight * log p(answer | masked, t)."""
    return score_points(denoise, batch, mask_id, schedule, times, generator).sum(0)


@torch.no_grad()
def score_points(denoise: Denoise, batch: Batch, mask_id: int, schedule: str,
                 times: list[tuple[float, float]], generator: torch.Generator) -> torch.Tensor:
    """`score_candidates` before the sum over t: [len(times), rows], each t's weighted term,
    the masks drawn in the same order (so the sum is the same figure)."""
    B, device = batch.input_ids.shape[0], batch.input_ids.device
    resp_len = batch.response_mask.sum(1).float()
    terms = torch.zeros(len(times), B, device=device)
    for i, (t_value, weight) in enumerate(times):
        t = torch.full((B,), t_value, device=device)
        noisy, masked = apply_mask(batch, t, mask_id, schedule, generator, nonempty=True)
        logp = F.log_softmax(denoise(noisy, batch.attention_mask, masked, t).float(), -1)
        token_logp = logp.gather(1, batch.input_ids[masked][:, None])[:, 0]
        row = masked.nonzero()[:, 0]
        per_row = torch.zeros(B, device=device).index_add_(0, row, token_logp)
        terms[i] = weight * elbo_factor(t, resp_len, schedule) * per_row
    return terms


@torch.no_grad()
def score_label_words(denoise: Denoise, batch: Batch, label_ids: list[int], schedule: str,
                      times: list[tuple[float, float]], mask_id: int) -> torch.Tensor:
    """Fast path for one-token label words: one forward per t scores every label at once.
    `batch` holds each prompt with a one-token answer slot. Returns [B, num_labels]."""
    B, device = batch.input_ids.shape[0], batch.input_ids.device
    slot = batch.response_mask
    noisy = torch.where(slot, torch.full_like(batch.input_ids, mask_id), batch.input_ids)
    scores = torch.zeros(B, len(label_ids), device=device)
    for t_value, weight in times:
        t = torch.full((B,), t_value, device=device)
        logp = F.log_softmax(denoise(noisy, batch.attention_mask, slot, t).float(), -1)
        scores += weight * elbo_factor(t, torch.ones(B, device=device), schedule)[:, None] * logp[:, label_ids]
    return scores


# ----------------------------------------------------------------------------- sampler


def step_times(steps: int) -> list[float]:
    """t at each reverse step, 1 down to 1/steps (then 0, the clean end): uniform in t as MDLM
    and LLaDA sample, for every schedule; the schedule enters through `transfer_counts`."""
    return [1.0 - s / steps for s in range(steps + 1)]


def transfer_counts(length: int, steps: int, schedule: str) -> list[int]:
    """How many tokens each reverse step unmasks. Step s (t_s to t_s+1) takes the share
    (p(t_s) - p(t_s+1)) / p(t_0) of the L tokens, what the forward process masks between those
    times, so the state told t_s+1 has about L p(t_s+1) / p(1) tokens masked, whatever the
    schedule. Shares are rounded by largest remainder, ties to the earlier step: for the linear
    schedule that is LLaDA's split (L split evenly, remainder first)."""
    p = mask_prob(torch.tensor(step_times(steps), dtype=torch.float64), schedule)
    share = (p[:-1] - p[1:]) / (p[0] - p[-1]) * length
    counts = torch.floor(share + 1e-9).long()
    frac = torch.round((share - counts) * 1e9)  # equal shares tie exactly despite rounding error
    order = sorted(range(steps), key=lambda s: (-float(frac[s]), s))
    for s in order[:length - int(counts.sum())]:
        counts[s] += 1
    return counts.tolist()


def block_masks(response_mask: torch.Tensor, block_length: int | None) -> list[torch.Tensor]:
    """The decoding blocks, each a [B, S] bool mask: the k-th run of `block_length` response
    positions of every row, the last one shorter (a row with a shorter response has empty later
    blocks). None: one block, the whole response."""
    if block_length is None:
        return [response_mask]
    rank = response_mask.long().cumsum(1) - 1  # 0 .. L-1 along each row's response
    n = max(1, math.ceil(int(response_mask.sum(1).max()) / block_length))
    return [response_mask & (rank // block_length == k) for k in range(n)]


@torch.no_grad()
def sample(denoise: Denoise, batch: Batch, mask_id: int, steps: int, remasking: str,
           generator: torch.Generator, schedule: str, block_length: int | None = None) -> torch.Tensor:
    """Reverse process from an all-masked response: T steps at `step_times`, each unmasking its
    `transfer_counts` share of tokens under `schedule`, chosen by confidence (low_confidence) or
    at random. Returns the ids [B, S] with the response filled in; rows may have different
    response lengths.

    `block_length` (None: one block) is LLaDA's semi-autoregressive decoding: the response is
    decoded in blocks of that many tokens, left to right, the last one shorter. The T steps are
    split evenly over the blocks (T must be a multiple of their count, else ValueError); each
    block spreads its tokens over its T / blocks steps by `transfer_counts`, and only its masked
    positions are predicted and unmasked, later blocks staying [MASK] in the input (LLaDA's
    generate.py). The t handed to `denoise` stays the global schedule's: the g-th of the T steps
    is told `step_times(T)[g]` whichever block it is in, so each of the T steps (each per_step
    module) runs once, as without blocks; for the linear schedule that t is also the fraction of
    the whole response still masked. One block of the response's length is the plain sampler."""
    ids = torch.where(batch.response_mask, torch.full_like(batch.input_ids, mask_id), batch.input_ids)
    blocks = block_masks(batch.response_mask, block_length)
    if steps % len(blocks):
        raise ValueError(f"{steps} sampler steps do not split evenly over {len(blocks)} blocks")
    per_block, times = steps // len(blocks), step_times(steps)
    for k, block in enumerate(blocks):
        plans = [transfer_counts(int(n), per_block, schedule) for n in block.sum(1).tolist()]
        for s in range(per_block):
            still = (ids == mask_id) & block
            if not still.any():
                break
            t = torch.full((ids.shape[0],), times[k * per_block + s], device=ids.device)
            unmask_step(denoise, ids, batch.attention_mask, still, t, [plan[s] for plan in plans],
                        mask_id, remasking, generator)
    return ids


def unmask_step(denoise: Denoise, ids: torch.Tensor, attention_mask: torch.Tensor, still: torch.Tensor,
                t: torch.Tensor, takes: list[int], mask_id: int, remasking: str,
                generator: torch.Generator) -> None:
    """One reverse step, in place: predict the `still` positions and unmask, in each row b, the
    takes[b] of them with the most confident predictions (or random ones)."""
    logits = denoise(ids, attention_mask, still, t).float()
    logits[:, mask_id] = float("-inf")  # the reverse process never emits [MASK] itself
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    if remasking == "random":
        conf = draw(conf.shape, generator, conf.device)
    rows = still.nonzero()
    for b, take in enumerate(takes):
        sel = (rows[:, 0] == b).nonzero()[:, 0]
        if take == 0 or len(sel) == 0:
            continue
        best = sel[conf[sel].topk(min(take, len(sel))).indices]
        ids[b, rows[best, 1]] = pred[best]
