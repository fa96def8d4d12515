"""How good a prepared backbone is, on held-out text: masked-token accuracy, the ELBO perplexity
bound, and a few generated completions a reader can judge.

At a fixed t every token of a window is masked with probability t. Masked-token accuracy is the
fraction of masked tokens whose argmax prediction is the clean token. The bound at t is
exp(-sum of diffusion.score_candidates at t / tokens): the 1/t-weighted cross-entropy per token,
the integrand of the ELBO at that t (the same estimator task evaluation uses). Its average over
t in (0, 1] is the ELBO itself, a bound on the log-likelihood: `bound_integrated` (stratified t)
is exp of that, a true upper bound on the perplexity.
"""

from __future__ import annotations

import math

import torch

from . import diffusion
from .prepare_corpus import window_batch

EVAL_TIMES = (0.15, 0.5, 0.85)
INTEGRATED_POINTS = 8


def _denoise(backbone):
    return lambda ids, attn, sel, t: backbone.logits(ids, attn, sel, t)


def _batches(tokenizer, windows, batch_size):
    for i in range(0, len(windows), batch_size):
        yield window_batch(tokenizer, windows[i:i + batch_size])


@torch.no_grad()
def masked_token_accuracy(backbone, windows, t_value: float, seed: int = 0,
                          batch_size: int = 64) -> float:
    """Fraction of masked tokens predicted exactly, each token masked with probability t."""
    backbone.model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for batch in _batches(backbone.tokenizer, windows, batch_size):
        t = torch.full((batch.input_ids.shape[0],), t_value)
        noisy, masked = diffusion.apply_mask(batch, t, backbone.mask_token_id, "linear", gen)
        if masked.any():
            pred = backbone.logits(noisy, batch.attention_mask, masked, t).argmax(-1)
            correct += int((pred == batch.input_ids[masked]).sum())
            total += int(masked.sum())
    return correct / max(total, 1)


@torch.no_grad()
def elbo_nll_per_token(backbone, windows, times, seed: int = 0, batch_size: int = 64) -> float:
    """-(ELBO estimate of log p) per token, from diffusion.score_candidates over `times`."""
    backbone.model.eval()
    gen = torch.Generator().manual_seed(seed)
    log_lik = tokens = 0.0
    for batch in _batches(backbone.tokenizer, windows, batch_size):
        scores = diffusion.score_candidates(_denoise(backbone), batch, backbone.mask_token_id,
                                            "linear", times, gen)
        log_lik += float(scores.sum())
        tokens += float(batch.response_mask.sum())
    return -log_lik / max(tokens, 1.0)


def heldout_report(backbone, windows, seed: int = 0) -> dict:
    """{"0.15": {"accuracy", "bound"}, ..., "integrated": {"bound"}} on held-out windows."""
    out = {}
    for t in EVAL_TIMES:
        nll = elbo_nll_per_token(backbone, windows, [(t, 1.0)], seed)
        out[str(t)] = {"accuracy": masked_token_accuracy(backbone, windows, t, seed),
                       "bound": math.exp(min(nll, 50.0))}
    times = diffusion.stratified_times([0.0, 1.0], INTEGRATED_POINTS, 1e-3)
    nll = elbo_nll_per_token(backbone, windows, times, seed)
    out["integrated"] = {"bound": math.exp(min(nll, 50.0))}
    return out


@torch.no_grad()
def completions(backbone, windows, seed: int = 0, length: int = 32) -> list[dict]:
    """Complete each window's second half from its first (the first `length` tokens, half kept
    clean), by the reverse sampler: one token per step, most confident first."""
    backbone.model.eval()
    tok = backbone.tokenizer
    rows = [w[:length] for w in windows]
    out = []
    for w in rows:
        keep = len(w) // 2
        while keep < len(w) - 1 and tok.convert_ids_to_tokens(w[keep]).startswith("##"):
            keep += 1  # cut between words, not inside one
        batch = window_batch(tok, [w], prefix=keep)
        steps = int(batch.response_mask.sum())
        ids = diffusion.sample(_denoise(backbone), batch, backbone.mask_token_id, steps,
                               "low_confidence", torch.Generator().manual_seed(seed), "linear")
        gen_ids = ids[0][batch.response_mask[0]].tolist()
        out.append({"prompt": tok.decode(w[:keep]), "reference": tok.decode(w[keep:]),
                    "generated": tok.decode(gen_ids)})
    return out


def format_table(before: dict, after: dict | None) -> str:
    """Held-out accuracy and bound at each t, before and after, as a small text table."""
    head = f"{'t':>10}  {'acc before':>10}  {'acc after':>9}  {'bound before':>12}  {'bound after':>11}"
    lines = [head]
    for key in [*map(str, EVAL_TIMES), "integrated"]:
        b, a = before[key], (after or {}).get(key, {})
        acc_b = f"{b['accuracy']:.3f}" if "accuracy" in b else "-"
        acc_a = f"{a['accuracy']:.3f}" if "accuracy" in a else "-"
        bound_a = f"{a['bound']:.1f}" if "bound" in a else "-"
        lines.append(f"{key:>10}  {acc_b:>10}  {acc_a:>9}  {b['bound']:>12.1f}  {bound_a:>11}")
    return "\n".join(lines)
